package pump

import (
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// watchdog closes a connection after idle without progress. It samples a
// monotonic progress counter every idle/4 instead of touching deadlines on
// every read, which keeps the splice path free of bookkeeping. A silent
// connection is closed between idle and idle+idle/2 after its last byte.
type watchdog struct {
	mu         sync.Mutex
	t          *time.Timer
	stopped    bool
	idle       time.Duration
	period     time.Duration
	last       uint64
	lastChange time.Time
	progress   func() uint64
	onIdle     func()
}

func startWatchdog(idle time.Duration, progress func() uint64, onIdle func()) *watchdog {
	w := &watchdog{
		idle:       idle,
		period:     max(idle/4, time.Millisecond),
		progress:   progress,
		onIdle:     onIdle,
		lastChange: time.Now(),
		// last stays 0 instead of sampling now: the first check then counts
		// as activity, which delays detection by one period but keeps two
		// getsockopt calls off the per-connection setup path.
	}
	w.mu.Lock()
	w.t = time.AfterFunc(w.period, w.check)
	w.mu.Unlock()
	return w
}

func (w *watchdog) check() {
	v := w.progress()
	now := time.Now()
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	if v != w.last {
		w.last, w.lastChange = v, now
	}
	if now.Sub(w.lastChange) >= w.idle {
		w.stopped = true
		w.mu.Unlock()
		w.onIdle()
		return
	}
	w.t.Reset(w.period)
	w.mu.Unlock()
}

func (w *watchdog) stop() {
	if w == nil {
		return
	}
	w.mu.Lock()
	w.stopped = true
	w.t.Stop()
	w.mu.Unlock()
}

// kernelBytesReceived is tcpi_bytes_received of the TCP socket under c (0 if
// there is none or it is closed). The kernel counts every byte the peer
// delivered, including those splice moves without user-space seeing them.
func kernelBytesReceived(c net.Conn) uint64 {
	tc := TCPOf(c)
	if tc == nil {
		return 0
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	_ = rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Bytes_received
		}
	})
	return n
}
