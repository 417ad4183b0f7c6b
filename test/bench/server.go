package main

// The server side of the load generator protocol (see loadgen.go) and the
// readiness probe.

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

func serverMain(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	addr := fs.String("addr", ":8080", "listen address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	raiseNofile()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	fmt.Println("ready", ln.Addr())
	return serve(ctx, ln)
}

// serve runs until ctx ends; it closes ln and every open connection then.
func serve(ctx context.Context, ln net.Listener) error {
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	var wg sync.WaitGroup
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				wg.Wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: back off instead of spinning.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
}

func handle(c net.Conn) {
	var hdr [1]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	switch hdr[0] {
	case modeSink:
		var nb [8]byte
		if _, err := io.ReadFull(c, nb[:]); err != nil {
			return
		}
		n := int64(binary.BigEndian.Uint64(nb[:]))
		buf := make([]byte, 256<<10)
		if _, err := io.CopyBuffer(io.Discard, io.LimitReader(readerOnly{c}, n), buf); err != nil {
			return
		}
		c.Write([]byte{1})
	case modeEcho:
		// A plain read/write loop, not io.Copy: io.Copy between TCP
		// conns splices through a pipe held for the connection's life,
		// two more fds per connection, which breaks the idle scenario.
		buf := make([]byte, 4<<10)
		io.CopyBuffer(writerOnly{c}, readerOnly{c}, buf)
	}
}

// readerOnly hides io.Discard's ReaderFrom path (8 KiB reads) so the sink
// reads with our 256 KiB buffer.
type readerOnly struct{ io.Reader }

// writerOnly hides the conn's ReadFrom (which would splice or allocate its
// own buffer).
type writerOnly struct{ io.Writer }

// probeMain retries a 1 KiB echo through addr until one succeeds: the
// readiness check of a path end to end (proxies listening, upstreams
// resolved, certificates issued).
func probeMain(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port")
	timeout := fs.Duration("timeout", 20*time.Second, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		last = echoOnce(ctx, *addr)
		if last == nil {
			fmt.Println("ok")
			return nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("probe %s: not ready after %v: %v", *addr, *timeout, last)
}

func echoOnce(ctx context.Context, addr string) error {
	c, err := dial(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	msg := make([]byte, 1+msgSize)
	msg[0] = modeEcho
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_, err = io.ReadFull(c, msg[:msgSize])
	return err
}
