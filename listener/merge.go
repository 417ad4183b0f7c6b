package listener

import (
	"net"
	"sync"
)

// Merge serves several listening sockets as one: the first one names the
// merged acceptor (Addr), the others feed the same accept loop. A dual-stack
// pod needs this for the outbound listener: the IPv4 REDIRECT rule sends to
// 127.0.0.1 and the IPv6 one to ::1, and no single socket can be bound to
// both.
//
// Each socket has its own accept goroutine that hands one result at a time
// to AcceptTCP, so a socket's accept errors reach the caller (and its
// backoff) in order. A non-retryable error is passed on once and ends only
// that socket's goroutine; the caller is expected to stop on it, as for a
// single socket. Close closes every socket, ends the goroutines and closes
// any connection accepted but not yet handed out.
func Merge(first TCPAcceptor, more ...TCPAcceptor) TCPAcceptor {
	if len(more) == 0 {
		return first
	}
	m := &merged{
		all:  append([]TCPAcceptor{first}, more...),
		ch:   make(chan acceptResult),
		done: make(chan struct{}),
	}
	for _, ln := range m.all {
		m.wg.Add(1)
		go m.loop(ln)
	}
	return m
}

type acceptResult struct {
	c   *net.TCPConn
	err error
}

type merged struct {
	all       []TCPAcceptor
	ch        chan acceptResult
	done      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

func (m *merged) loop(ln TCPAcceptor) {
	defer m.wg.Done()
	for {
		c, err := ln.AcceptTCP()
		select {
		case m.ch <- acceptResult{c, err}:
		case <-m.done:
			if c != nil {
				c.Close()
			}
			return
		}
		if err != nil && !Retryable(err) {
			return
		}
	}
}

func (m *merged) AcceptTCP() (*net.TCPConn, error) {
	select {
	case r := <-m.ch:
		return r.c, r.err
	case <-m.done:
		return nil, net.ErrClosed
	}
}

// Close closes every socket and waits for the accept goroutines to end.
// It is idempotent.
func (m *merged) Close() error {
	m.closeOnce.Do(func() {
		close(m.done)
		for _, ln := range m.all {
			if err := ln.Close(); err != nil && m.closeErr == nil {
				m.closeErr = err
			}
		}
		m.wg.Wait()
	})
	return m.closeErr
}

func (m *merged) Addr() net.Addr { return m.all[0].Addr() }

// Addrs lists every socket's address, the first one first.
func (m *merged) Addrs() []net.Addr {
	out := make([]net.Addr, len(m.all))
	for i, ln := range m.all {
		out[i] = ln.Addr()
	}
	return out
}

// Addrs lists the addresses a TCPAcceptor (merged or not) listens on.
func Addrs(ln TCPAcceptor) []net.Addr {
	if m, ok := ln.(*merged); ok {
		return m.Addrs()
	}
	return []net.Addr{ln.Addr()}
}
