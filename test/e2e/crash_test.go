package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestCrashResetsApps SIGKILLs ferry while one outbound (app → ferry → ext,
// passthrough) and one inbound (ext → ferry → app, permissive) connection
// are live and idle with nothing unread, and checks that every plain-TCP
// peer of ferry sees a reset, not a clean EOF: the app's client, the app's
// server, and the two outside ends. The kernel closes a dead process's
// sockets with a FIN when nothing is unread; ferry arms its plain legs
// with SO_LINGER {on, 0} while they are live (pump.ArmReset) so that a
// crash cannot pass for the end of a stream.
func TestCrashResetsApps(t *testing.T) {
	testbed.RequireRoot(t)
	e := &dpEnv{ferryBin: testbed.FerryBinary(t)}
	e.tb = testbed.New(t)
	e.app = e.tb.AddPod(t, "app")
	e.ext = e.tb.AddPod(t, "ext")
	e.proxyID = e.tb.Register(t, testbed.Service{Name: "web", Pod: e.app, Port: dpAppPort}).ProxyID
	extLn := meshListenIn(t, e.ext, ":"+dpExtPort)
	appLn := meshListenIn(t, e.app, "127.0.0.1:"+strconv.Itoa(dpAppPort))
	e.installRedirect(t)
	e.admin = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dpDialIn(ctx, e.app, addr)
		},
	}}
	e.startFerry(t)

	ctx := context.Background()
	// Outbound: the app's client, through ferry, to the server in ext.
	appClient, err := dpDialIn(ctx, e.app, net.JoinHostPort(e.ext.IP.String(), dpExtPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appClient.Close() })
	extServer := crExchange(t, appClient, extLn)
	// Inbound: a client in ext, through ferry, to the app's server.
	extClient, err := dpDialIn(ctx, e.ext, net.JoinHostPort(e.app.IP.String(), strconv.Itoa(dpAppPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { extClient.Close() })
	appServer := crExchange(t, extClient, appLn)

	if err := e.ferry.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.ferry.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("ferry still running 10 s after SIGKILL")
	}
	for _, c := range []struct {
		name string
		conn net.Conn
	}{
		{"the app's client (outbound, client side)", appClient},
		{"the app's server (inbound, server side)", appServer},
		{"the outside server (outbound passthrough)", extServer},
		{"the outside client (inbound, permissive)", extClient},
	} {
		c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.conn.Read(make([]byte, 1))
		if !errors.Is(err, syscall.ECONNRESET) {
			if err == io.EOF {
				t.Errorf("%s read a clean EOF after ferry was killed: a crash passed for the end of the stream", c.name)
			} else {
				t.Errorf("%s: read %v, want ECONNRESET", c.name, err)
			}
		}
	}
}

// crAccept accepts one connection on ln (within 10 s).
func crAccept(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		ch <- c
	}()
	select {
	case c := <-ch:
		if c == nil {
			t.FailNow()
		}
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted within 10 s")
		return nil
	}
}

// crExchange sends a message each way between client and the connection
// it accepts on ln (client first: permissive inbound waits for the first
// bytes to tell TLS from plain), and reads it, so that neither end has
// anything unread (the case where the kernel closes with a FIN).
func crExchange(t *testing.T, client net.Conn, ln net.Listener) (server net.Conn) {
	t.Helper()
	msg := []byte("ping through ferry")
	if _, err := client.Write(msg); err != nil {
		t.Fatal(err)
	}
	server = crAccept(t, ln)
	for _, d := range [][2]net.Conn{{client, server}, {server, client}} {
		if d[0] == server {
			if _, err := d[0].Write(msg); err != nil {
				t.Fatal(err)
			}
		}
		d[1].SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(d[1], make([]byte, len(msg))); err != nil {
			t.Fatal(err)
		}
		d[1].SetReadDeadline(time.Time{})
	}
	return server
}
