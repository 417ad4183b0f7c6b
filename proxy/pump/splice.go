package pump

import (
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

// Why ferry splices itself instead of io.Copy(*net.TCPConn, *net.TCPConn):
//
// The runtime's splice path asks for a 1 MiB pipe per io.Copy and holds it
// for the whole copy, i.e. for the connection's lifetime. The kernel
// charges pipe pages to the user, and once a user holds more than
// fs.pipe-user-pages-soft (16384 pages = 64 MiB) F_SETPIPE_SZ fails and
// every new pipe gets 2 pages (8 KiB). All sidecars run as the same UID
// (5995), so the budget is shared by every ferry on a node: past 64 pipes
// (32 busy connections) splice degrades to 8 KiB per call, which is slower
// and costs more CPU than a plain user-space copy. We measured exactly
// that: ~4 Gbit/s at ~1.4 CPU-s/GB instead of ~13 Gbit/s at ~0.3.
//
// So: a pipe is held only while data is moving (a connection waiting for
// its peer holds none), and when the kernel hands out a pipe smaller than
// 64 KiB the direction falls back to the pooled-buffer copy instead of
// splicing through a tiny pipe.
//
// Pipes are 1 MiB (fs.pipe-max-size, the most an unprivileged user may
// ask for): one splice then moves up to 1 MiB per wakeup. The bench's
// passthrough path, interleaved A/B, 8 repetitions (bench -ferry-b):
// 256 KiB pipes 11.1 Gbit/s at 0.39 CPU-s/GB, 512 KiB 10.6 / 0.39 (its
// own A 10.3 / 0.45), 1 MiB 12.8 Gbit/s at 0.29 CPU-s/GB; 64 connections
// 0.43 -> 0.33 CPU-s/GB. The budget then covers 64 busy directions per
// node at full size; past that each new pipe takes the largest size that
// still fits (1 MiB, 256 KiB, 64 KiB), and only then the buffered copy.

const (
	pipeWant = 1 << 20
	pipeMin  = 64 << 10 // the default pipe size; below it the user is over budget
	// idle pipes kept for reuse (the rest are closed): 16 MiB at most of the
	// UID's 64 MiB budget, so idle pipes never starve busy connections.
	pipeIdleBytes = 16 << 20
)

// errSmallPipe means the kernel would only give a pipe below pipeMin.
var errSmallPipe = errors.New("pipe below minimum size (user over fs.pipe-user-pages-soft)")

type pipe struct{ r, w, size int }

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// pipePool hands out empty pipes. Pipes go back only when drained.
type pipePool struct {
	free      chan *pipe
	want, min int
	// setSize is F_SETPIPE_SZ (a seam for tests: as root the kernel
	// grants any size).
	setSize func(fd, size int) error
}

func newPipePool(want, min, idleBytes int) *pipePool {
	return &pipePool{free: make(chan *pipe, max(1, idleBytes/want)), want: want, min: min, setSize: setPipeSize}
}

func setPipeSize(fd, size int) error {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_SETPIPE_SZ, size)
	return err
}

// pipes is shared by every pump in the process: the kernel budget it
// manages is per user anyway.
var pipes = newPipePool(pipeWant, pipeMin, pipeIdleBytes)

func (pp *pipePool) get() (*pipe, error) {
	select {
	case p := <-pp.free:
		return p, nil
	default:
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	p := &pipe{r: fds[0], w: fds[1]}
	// EPERM when the UID's pipe budget cannot take this size: try smaller.
	for size := pp.want; size >= pp.min && pp.setSize(p.w, size) != nil; size /= 4 {
	}
	size, err := unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	if err != nil || size < pp.min {
		p.close()
		return nil, errSmallPipe
	}
	p.size = size
	return p, nil
}

func (pp *pipePool) put(p *pipe) {
	select {
	case pp.free <- p:
	default:
		p.close()
	}
}

// spliceCopy moves src→dst with splice(2) until src's EOF (nil error).
// fallback is true when no usable pipe could be had (between chunks, so no
// byte is in flight); the caller then continues with a buffered copy.
func spliceCopy(dst, src *net.TCPConn, pp *pipePool) (written int64, fallback bool, err error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, false, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, false, err
	}
	var p *pipe
	defer func() {
		if p != nil {
			p.close() // may hold data after an error; never reuse it
		}
	}()
	for {
		var n int64
		var serr, perr error
		rerr := srcRC.Read(func(fd uintptr) bool {
			if p == nil {
				if p, perr = pp.get(); perr != nil {
					return true
				}
			}
			for {
				n, serr = unix.Splice(int(fd), nil, p.w, nil, p.size, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
				if serr != unix.EINTR {
					break
				}
			}
			if serr == unix.EAGAIN {
				// Nothing to read: wait for the peer without holding a pipe.
				pp.put(p)
				p = nil
				return false
			}
			return true
		})
		switch {
		case perr != nil:
			// No pipe (over the pipe budget, or out of descriptors): the
			// buffered copy needs neither, and nothing is in flight.
			return written, true, perr
		case rerr != nil:
			return written, false, rerr
		case serr != nil:
			return written, false, serr
		case n == 0: // EOF
			pp.put(p)
			p = nil
			return written, false, nil
		}

		remaining := int(n)
		var merr error
		werr := dstRC.Write(func(fd uintptr) bool {
			for remaining > 0 {
				m, e := unix.Splice(p.r, nil, int(fd), nil, remaining, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
				switch e {
				case nil:
					remaining -= int(m)
					written += m
				case unix.EINTR:
				case unix.EAGAIN:
					return false // destination full: wait until writable
				default:
					merr = e
					return true
				}
			}
			return true
		})
		if werr != nil {
			return written, false, werr
		}
		if merr != nil {
			return written, false, merr
		}
		// The pipe is empty again; keep it while data keeps coming.
	}
}

// ErrNoPipe: SpliceChunk could get no usable pipe (over the pipe budget):
// nothing moved; the caller copies this chunk through a buffer instead.
var ErrNoPipe = errors.New("pump: no usable pipe")

// SpliceChunk moves up to max bytes src→dst through a pooled pipe: it
// waits for src without holding a pipe, splices what src has (at most
// max) into the pipe and all of it out to dst. It returns 0, nil at src's
// end, and src's splice error as is (EINVAL out of a kernel TLS socket: a
// record that is not data comes next; nothing moved).
func SpliceChunk(dst, src *net.TCPConn, max int) (int64, error) {
	return spliceChunk(dst, src, max, nil)
}

// SpliceChunkAfter is SpliceChunk with before(n) called once the pipe
// holds n bytes and before they go out (a frame header). When before
// returns keep, the n bytes are not spliced out but read into buf (which
// must hold max bytes) and returned as buf[:n] for the caller to write.
func SpliceChunkAfter(dst, src *net.TCPConn, max int, buf []byte, before func(n int) (keep bool, err error)) (int64, []byte, error) {
	var kept []byte
	n, err := spliceChunk(dst, src, max, func(p *pipe, n int) (bool, error) {
		keep, err := before(n)
		if err != nil || !keep {
			return false, err
		}
		for got := 0; got < n; {
			m, rerr := unix.Read(p.r, buf[got:n])
			if rerr == unix.EINTR {
				continue
			}
			if rerr != nil {
				return true, rerr
			}
			got += m
		}
		kept = buf[:n]
		return true, nil
	})
	return n, kept, err
}

func spliceChunk(dst, src *net.TCPConn, max int, before func(p *pipe, n int) (done bool, err error)) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var p *pipe
	var n int64
	var serr, perr error
	rerr := srcRC.Read(func(fd uintptr) bool {
		if p == nil {
			if p, perr = pipes.get(); perr != nil {
				return true
			}
		}
		for {
			n, serr = unix.Splice(int(fd), nil, p.w, nil, min(max, p.size), unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			if serr != unix.EINTR {
				break
			}
		}
		if serr == unix.EAGAIN {
			pipes.put(p) // wait for the peer without holding a pipe
			p = nil
			return false
		}
		return true
	})
	switch {
	case perr != nil:
		return 0, ErrNoPipe
	case rerr != nil:
		if p != nil {
			p.close()
		}
		return 0, rerr
	case serr != nil:
		p.close() // nothing in it, but never reuse a pipe after an error
		return 0, serr
	case n == 0:
		pipes.put(p)
		return 0, nil
	}
	if before != nil {
		done, err := before(p, int(n))
		if err != nil {
			p.close()
			return 0, err
		}
		if done {
			pipes.put(p)
			return n, nil
		}
	}
	remaining := int(n)
	var merr error
	werr := dstRC.Write(func(fd uintptr) bool {
		for remaining > 0 {
			m, e := unix.Splice(p.r, nil, int(fd), nil, remaining, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			switch e {
			case nil:
				remaining -= int(m)
			case unix.EINTR:
			case unix.EAGAIN:
				return false
			default:
				merr = e
				return true
			}
		}
		return true
	})
	if werr == nil {
		werr = merr
	}
	if werr != nil {
		p.close() // may hold data
		return n - int64(remaining), werr
	}
	pipes.put(p)
	return n, nil
}
