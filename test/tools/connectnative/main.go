// Command connectnative is a Consul connect-native app for ferry's interop
// tests, built from Consul's own connect package (v1.14.11, this tools
// module): its TLS configs offer and serve ALPN h2, as every connect-native
// Go service does, which a TLS peer must not refuse.
//
//	connectnative server -service api -addr :8443
//	connectnative client -service web -addr 198.18.0.3:20000 -target backend -bytes 1048576
//
// The Consul agent is CONSUL_HTTP_ADDR. The server echoes each connection
// (half-close aware) and prints "ready" and "accept N alpn=PROTO"; the
// client sends -bytes, half-closes, checks the echo and prints "ok alpn=PROTO".
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"time"

	"github.com/hashicorp/consul/agent/connect"
	"github.com/hashicorp/consul/api"
	cnative "github.com/hashicorp/consul/connect"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "connectnative:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: connectnative server|client [flags]")
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	service := fs.String("service", "", "this app's service name")
	addr := fs.String("addr", "", "server: listen address; client: the peer's mTLS address")
	target := fs.String("target", "", "client: the peer's service name (its SPIFFE ID is checked)")
	size := fs.Int("bytes", 1<<20, "client: bytes to send")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	client, err := api.NewClient(api.DefaultConfig())
	if err != nil {
		return err
	}
	svc, err := cnative.NewService(*service, client)
	if err != nil {
		return err
	}
	defer svc.Close()
	select {
	case <-svc.ReadyWait():
	case <-time.After(30 * time.Second):
		return errors.New("no certificate from the agent within 30s")
	}
	switch args[0] {
	case "server":
		return serve(svc, *addr)
	case "client":
		return dial(client, svc, *addr, *target, *size)
	}
	return fmt.Errorf("unknown mode %q", args[0])
}

func serve(svc *cnative.Service, addr string) error {
	ln, err := tls.Listen("tcp", addr, svc.ServerTLSConfig())
	if err != nil {
		return err
	}
	fmt.Println("ready", ln.Addr())
	for n := 1; ; n++ {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func(n int, c *tls.Conn) {
			defer c.Close()
			c.SetDeadline(time.Now().Add(time.Minute))
			if err := c.Handshake(); err != nil {
				fmt.Printf("handshake %d failed: %v\n", n, err)
				return
			}
			fmt.Printf("accept %d alpn=%q\n", n, c.ConnectionState().NegotiatedProtocol)
			io.Copy(c, c)
			c.CloseWrite()
		}(n, c.(*tls.Conn))
	}
}

func dial(client *api.Client, svc *cnative.Service, addr, target string, size int) error {
	roots, _, err := client.Agent().ConnectCARoots(nil)
	if err != nil {
		return err
	}
	self, err := client.Agent().Self()
	if err != nil {
		return err
	}
	dc, _ := self["Config"]["Datacenter"].(string)
	uri := &connect.SpiffeIDService{Host: roots.TrustDomain, Namespace: "default", Datacenter: dc, Service: target}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := svc.Dial(ctx, &cnative.StaticResolver{Addr: addr, CertURI: uri})
	if err != nil {
		return err
	}
	defer c.Close()
	tc := c.(*tls.Conn)
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	msg := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range msg {
		msg[i] = byte(r.Uint32())
	}
	werr := make(chan error, 1)
	go func() {
		_, err := tc.Write(msg)
		if err == nil {
			err = tc.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(tc)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo: %d bytes back, %d sent, or different", len(got), len(msg))
	}
	fmt.Printf("ok alpn=%q bytes=%d\n", tc.ConnectionState().NegotiatedProtocol, size)
	return nil
}
