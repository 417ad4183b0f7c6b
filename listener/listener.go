package listener

import (
	"errors"
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
	// MaxConns caps connections being handled at once; 0 means no cap.
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
	return &Listener{ln: ln, opts: opts, log: log, sleep: time.Sleep, idle: idle}
}

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Active is the number of connections whose Handler has not returned.
func (l *Listener) Active() int { return int(l.active.Load()) }

// Serve accepts until Close and runs h for every connection in its own
// goroutine. It returns nil after Close, or the first accept error that
// retrying cannot fix.
func (l *Listener) Serve(h Handler) error {
	backoff := time.Duration(0)
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if !Retryable(err) {
				l.log.Error("accept failed, listener stops", "addr", l.ln.Addr(), "error", err)
				return err
			}
			backoff = NextBackoff(backoff)
			l.log.Warn("accept error, backing off", "error", err, "backoff", backoff)
			if l.opts.OnAcceptError != nil {
				l.opts.OnAcceptError(err)
			}
			l.sleep(backoff)
			continue
		}
		backoff = 0
		if l.opts.MaxConns > 0 && l.active.Load() >= int64(l.opts.MaxConns) {
			l.refuse(c)
			continue
		}
		l.begin()
		go func() {
			defer l.end()
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

// Retryable reports whether an accept error is worth retrying: resource
// exhaustion and aborted handshakes clear by themselves.
func Retryable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []syscall.Errno{
		syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EINTR, syscall.EAGAIN,
		syscall.EPROTO, syscall.EPERM, // EPERM: a firewall rule refused the new socket
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
