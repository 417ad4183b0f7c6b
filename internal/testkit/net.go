package testkit

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// TCPPair returns the two ends of a fresh loopback TCP connection, closed
// when the test ends.
func TCPPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- res{c, err}
	}()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { client.Close(); r.c.Close() })
	return client, r.c
}

// Serve accepts on a fresh 127.0.0.1 listener until the test ends, calling
// handle for each connection in the accept loop (start a goroutine in it
// to serve connections at once), and returns the listener's address.
func Serve(t testing.TB, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ServeOn(t, ln, handle)
	return ln.Addr().String()
}

// ServeOn is Serve on ln; ln is closed, and the accept loop waited for,
// when the test ends.
func ServeOn(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
}

// EchoServer echoes every connection on 127.0.0.1 until EOF, then
// half-closes; it stops when the test ends. It returns its address.
func EchoServer(t testing.TB) string {
	t.Helper()
	return PrefixServer(t, "")
}

// PrefixServer is EchoServer that first writes prefix on each connection,
// to tell apps apart.
func PrefixServer(t testing.TB, prefix string) string {
	t.Helper()
	return Serve(t, func(c net.Conn) { go echo(c, prefix) })
}

// ServeEcho serves ln as PrefixServer does, closing it when the test ends.
func ServeEcho(t testing.TB, ln net.Listener, prefix string) {
	ServeOn(t, ln, func(c net.Conn) { go echo(c, prefix) })
}

func echo(c net.Conn, prefix string) {
	defer c.Close()
	if prefix != "" {
		c.Write([]byte(prefix))
	}
	io.Copy(c, c)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// Dial connects to addr over TCP and closes the connection when the test
// ends.
func Dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ReadAllTimeout reads c to EOF, giving up after d.
func ReadAllTimeout(t testing.TB, c net.Conn, d time.Duration) ([]byte, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	return io.ReadAll(c)
}

// IsClosedOrReset reports whether err is what a reader of a closed or
// reset connection sees (or nil).
func IsClosedOrReset(err error) bool {
	return err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
		strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "broken pipe")
}
