package listener

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Backoff bounds for accept errors such as EMFILE: the loop must neither
// spin on a persistent error nor stall long after it clears.
const (
	MinBackoff = 5 * time.Millisecond
	MaxBackoff = time.Second
)

// Handler serves one accepted connection and owns it: it must close it. The
// listener counts the connection as active until Handler returns.
type Handler func(c *net.TCPConn)

// TCPAcceptor is the part of *net.TCPListener the loop needs; tests
// substitute it to inject accept errors.
type TCPAcceptor interface {
	AcceptTCP() (*net.TCPConn, error)
	Close() error
	Addr() net.Addr
}

// Options configures a Listener. The zero value is usable.
type Options struct {
	// Name labels log lines ("inbound", "outbound").
	Name string
	// MaxConns caps connections being handled at once (with MaxPending:
	// connections past their handshake); 0 means no cap.
	//
	// Past the cap a new connection is accepted and reset at once (RST,
	// not FIN), logged (rate limited) and reported through OnOverLimit.
	// Leaving it in the kernel backlog instead would look like success to
	// the client (the handshake completes in the kernel) and then hang
	// until its own timeout; once the backlog filled, SYNs would be dropped
	// and retried over seconds. A reset fails fast, is visible to the app
	// as "connection reset", and is counted.
	MaxConns int
	Logger   hclog.Logger
	// OnOverLimit is called once per connection refused by the cap.
	OnOverLimit func()
	// OnAcceptError is called for every accept error that the loop backs
	// off from (metrics hook).
	OnAcceptError func(error)

	// MaxPending > 0 turns on handshake accounting (pending.go): a new
	// connection is pending until its handler calls Established, and
	// pending connections count against MaxPending (and
	// MaxPendingPerSource) instead of MaxConns. 0: every accepted
	// connection counts against MaxConns from the start.
	MaxPending int
	// MaxPendingPerSource caps the silent pending connections from one
	// source IP (for a global IPv6 address: its /64); 0 means no
	// per-source cap. Only with MaxPending.
	MaxPendingPerSource int
	// SilentAfter is how long a pending connection may go without a byte
	// from its client before it counts as silent: silent ones count
	// against MaxPendingPerSource and are evicted first. 0: at once.
	SilentAfter time.Duration
	// OnPendingEvicted is called once per pending connection reset to
	// make room for a newer one.
	OnPendingEvicted func()
}

// Listener runs an accept loop over a TCP listener.
type Listener struct {
	ln   TCPAcceptor
	opts Options
	log  hclog.Logger

	active    atomic.Int64
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
	lastWarn  atomic.Int64 // unix nanos of the last over-limit log line

	// Handlers in flight. Not a WaitGroup: Wait may run while Serve still
	// adds handlers (readiness of a drain is "none left right now").
	mu   sync.Mutex
	n    int
	idle chan struct{} // closed while n == 0

	// stopped is set when Serve has returned: no handler starts after it.
	stopped atomic.Bool

	pend pendingSet // handshake accounting, when opts.MaxPending > 0

	sleep func(time.Duration) // replaced in tests
}

// New wraps ln (normally a *net.TCPListener). Serve starts accepting.
func New(ln TCPAcceptor, opts Options) *Listener {
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if opts.Name != "" {
		log = log.Named(opts.Name)
	}
	idle := make(chan struct{})
	close(idle)
	l := &Listener{ln: ln, opts: opts, log: log, sleep: time.Sleep, idle: idle}
	l.pend.init()
	return l
}

// Addr is the bound address (the first one of a Merge).
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Addrs lists every bound address (more than one for a Merge).
func (l *Listener) Addrs() []net.Addr { return Addrs(l.ln) }

// Active is the number of connections whose Handler has not returned.
func (l *Listener) Active() int { return int(l.active.Load()) }

// Serve accepts until Close and runs h for every connection in its own
// goroutine. It returns nil after Close, or the first accept error that
// retrying cannot fix; the caller logs that one (it knows what the listener
// was for) and should treat it as fatal: nothing accepts on the socket
// any more.
func (l *Listener) Serve(h Handler) error {
	defer l.stopped.Store(true)
	backoff := time.Duration(0)
	// Out of fds, accept fails again as soon as a connection freed one was
	// taken: one line per failure would be hundreds a second.
	var lastLog time.Time
	suppressed := 0
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if !Retryable(err) {
				return fmt.Errorf("accept on %s: %w", l.ln.Addr(), err)
			}
			backoff = NextBackoff(backoff)
			if now := time.Now(); now.Sub(lastLog) >= time.Second {
				l.log.Warn("accept error, backing off", "error", err, "backoff", backoff, "suppressed_since_last", suppressed)
				lastLog, suppressed = now, 0
			} else {
				suppressed++
			}
			if l.opts.OnAcceptError != nil {
				l.opts.OnAcceptError(err)
			}
			l.sleep(backoff)
			continue
		}
		backoff = 0
		if l.opts.MaxPending > 0 {
			if !l.admitPending(c) {
				l.refuse(c)
				continue
			}
		} else if l.opts.MaxConns > 0 && l.active.Load() >= int64(l.opts.MaxConns) {
			l.refuse(c)
			continue
		}
		l.begin()
		go func() {
			defer l.end()
			defer l.forget(c)
			h(c)
		}()
	}
}

func (l *Listener) begin() {
	l.active.Add(1)
	l.mu.Lock()
	if l.n == 0 {
		l.idle = make(chan struct{})
	}
	l.n++
	l.mu.Unlock()
}

func (l *Listener) end() {
	l.active.Add(-1)
	l.mu.Lock()
	l.n--
	if l.n == 0 {
		close(l.idle)
	}
	l.mu.Unlock()
}

func (l *Listener) refuse(c *net.TCPConn) {
	// Count before closing, so that whoever sees the reset sees the count.
	if l.opts.OnOverLimit != nil {
		l.opts.OnOverLimit()
	}
	_ = c.SetLinger(0) // close with RST: fail fast instead of an orderly FIN
	_ = c.Close()
	// One line per second at most: an overload must not turn into a log flood.
	now := time.Now().UnixNano()
	last := l.lastWarn.Load()
	if now-last >= int64(time.Second) && l.lastWarn.CompareAndSwap(last, now) {
		l.log.Warn("connection limit reached, resetting new connections",
			"max_connections", l.opts.MaxConns, "remote", c.RemoteAddr())
	}
}

// Close stops accepting. It is idempotent and does not wait for handlers;
// use Wait for that.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		l.closed.Store(true)
		l.closeErr = l.ln.Close()
	})
	return l.closeErr
}

// Finished reports whether the listener is closed, its accept loop has
// returned and no handler is running: nothing of it is left to wait for.
func (l *Listener) Finished() bool {
	if !l.closed.Load() || !l.stopped.Load() {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n == 0
}

// Wait blocks until no handler is running, or until done is closed (then
// it returns false). After Close it means every connection has finished.
func (l *Listener) Wait(done <-chan struct{}) bool {
	l.mu.Lock()
	idle := l.idle
	l.mu.Unlock()
	select {
	case <-idle:
		return true
	case <-done:
		return false
	}
}

// NextBackoff doubles d within [MinBackoff, MaxBackoff].
func NextBackoff(d time.Duration) time.Duration {
	if d < MinBackoff {
		return MinBackoff
	}
	d *= 2
	if d > MaxBackoff {
		return MaxBackoff
	}
	return d
}

// retryableErrnos clear by themselves: resource exhaustion, aborted
// handshakes, and the network errors of the new socket that Linux passes
// on to accept, which accept(2) says TCP callers should retry (ENETDOWN,
// EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
// ENETUNREACH). Go's poller retries only EINTR, EAGAIN and ECONNABORTED.
var retryableErrnos = [...]syscall.Errno{
	syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
	syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EINTR, syscall.EAGAIN,
	syscall.EPERM, // a firewall rule refused the new socket
	syscall.ENETDOWN, syscall.EPROTO, syscall.ENOPROTOOPT, syscall.EHOSTDOWN,
	syscall.ENONET, syscall.EHOSTUNREACH, syscall.EOPNOTSUPP, syscall.ENETUNREACH,
}

// Retryable reports whether an accept error is worth retrying (see
// retryableErrnos); anything else stops the listener.
func Retryable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range retryableErrnos {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
