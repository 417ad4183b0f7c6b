package ktls

import (
	"bytes"
	"context"
	"crypto/fips140"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"
)

// availableULP lists the upper-layer protocols the kernel has registered:
// "tls" appears once the tls module is loaded (or built in).
const availableULP = "/proc/sys/net/ipv4/tcp_available_ulp"

// ErrUnsupported: this kernel or process cannot use kernel TLS.
var ErrUnsupported = errors.New("ktls: not supported")

// Check reports why kernel TLS cannot be used here, or nil. It is cheap
// (one small /proc read) and says nothing about a particular connection:
// Enable can still refuse one.
//
// An unprivileged process cannot load the module (TCP_ULP's autoload needs
// CAP_NET_ADMIN in the initial namespace), so the node must load it: see
// the README ("modprobe tls").
func Check() error {
	if fips140.Enabled() {
		return fmt.Errorf("%w: FIPS 140-3 mode (record crypto would leave the Go module)", ErrUnsupported)
	}
	b, err := os.ReadFile(availableULP)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnsupported, err)
	}
	if !slices.ContainsFunc(bytes.Fields(b), func(f []byte) bool { return string(f) == "tls" }) {
		return fmt.Errorf("%w: the tls module is not loaded (%s: %q)", ErrUnsupported, availableULP, bytes.TrimSpace(b))
	}
	return nil
}

// Supported reports whether Check finds nothing against kernel TLS.
func Supported() bool { return Check() == nil }

// Probe proves kernel TLS works end to end in the current network
// namespace: it connects two loopback sockets, turns on TLS 1.3
// AES-128-GCM in both directions of both with a throwaway key, and sends
// a message each way through the kernel's record layer. It takes a few
// milliseconds; run it once at start.
func Probe(ctx context.Context) error {
	if err := Check(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	a, b, err := loopbackPair(ctx)
	if err != nil {
		return fmt.Errorf("ktls: probe: %w", err)
	}
	defer a.Close()
	defer b.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = a.SetDeadline(dl)
		_ = b.SetDeadline(dl)
	}
	s, _ := suiteFor(tls.TLS_AES_128_GCM_SHA256)
	secret1, secret2 := make([]byte, 32), make([]byte, 32)
	_, _ = rand.Read(secret1)
	_, _ = rand.Read(secret2)
	ca, err := enableRaw(a, s, secret1, secret2)
	if err != nil {
		return fmt.Errorf("ktls: probe: %w", err)
	}
	cb, err := enableRaw(b, s, secret2, secret1)
	if err != nil {
		return fmt.Errorf("ktls: probe: %w", err)
	}
	for _, dir := range [][2]*Conn{{ca, cb}, {cb, ca}} {
		msg := []byte("ferry ktls probe")
		if _, err := dir[0].Write(msg); err != nil {
			return fmt.Errorf("ktls: probe: write: %w", err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(dir[1], got); err != nil {
			return fmt.Errorf("ktls: probe: read: %w", err)
		}
		if !bytes.Equal(got, msg) {
			return fmt.Errorf("ktls: probe: read %q, wrote %q", got, msg)
		}
	}
	return nil
}

// enableRaw turns on kernel TLS on tcp with the given traffic secrets,
// both sequences at 0 (the probe, and tests that need no handshake).
func enableRaw(tcp *net.TCPConn, s suite, txSecret, rxSecret []byte) (*Conn, error) {
	txKey, txIV, err := trafficKeys(s, txSecret)
	if err != nil {
		return nil, err
	}
	rxKey, rxIV, err := trafficKeys(s, rxSecret)
	if err != nil {
		return nil, err
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return nil, err
	}
	err = control(rc, func(fd int) error {
		if err := setULP(fd); err != nil {
			return err
		}
		if err := setCrypto(fd, tlsTX, cryptoInfo(s, txKey, txIV, 0)); err != nil {
			return err
		}
		return setCrypto(fd, tlsRX, cryptoInfo(s, rxKey, rxIV, 0))
	})
	if err != nil {
		return nil, err
	}
	return newConn(tcp, rc, tls.ConnectionState{}), nil
}

// loopbackPair returns both ends of a new TCP connection over loopback.
func loopbackPair(ctx context.Context) (*net.TCPConn, *net.TCPConn, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	var d net.Dialer
	c1, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	select {
	case r := <-ch:
		if r.err != nil {
			c1.Close()
			return nil, nil, r.err
		}
		return c1.(*net.TCPConn), r.c.(*net.TCPConn), nil
	case <-ctx.Done():
		c1.Close()
		ln.Close()
		if r := <-ch; r.c != nil {
			r.c.Close()
		}
		return nil, nil, ctx.Err()
	}
}
