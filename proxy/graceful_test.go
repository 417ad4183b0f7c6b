package proxy

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// Graceful shutdown (consul-dataplane's): after DrainInbound, new inbound
// connections are refused while an established outbound connection keeps
// working and new outbound connections succeed; Shutdown then ends it.
func TestDrainInboundKeepsOutbound(t *testing.T) {
	testkit.CheckLeaks(t)
	p, dial := setupOutbound(t, Config{})
	long, err := dial("198.18.251.1:7000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { long.Close() })
	echo := func(c net.Conn, msg string) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadFull(c, make([]byte, len(msg)))
		return err
	}
	if err := echo(long, "before"); err != nil {
		t.Fatal(err)
	}
	in, _ := p.Addrs()

	p.DrainInbound()
	p.DrainInbound() // idempotent
	if err := p.Ready(); err == nil {
		t.Fatal("ready while draining")
	}
	if c, err := dial(in.String()); err == nil {
		c.Close()
		t.Fatal("new inbound connection accepted during the grace period")
	}
	if err := echo(long, "during grace"); err != nil {
		t.Fatalf("established outbound during grace: %v", err)
	}
	if got, err := dialExchange(t, dial, "198.18.251.1:7000", "new outbound"); err != nil || got != "new outbound" {
		t.Fatalf("new outbound during grace: %q %v", got, err)
	}
	// Re-applying the registration does not reopen the inbound.
	if err := p.Apply(Endpoints{Inbound: "127.0.0.2:0", Outbound: "127.0.0.1:0", LocalApp: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	if in2, _ := p.Addrs(); in2 != nil && in2.String() != in.String() {
		t.Fatalf("inbound reopened on %v", in2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	long.Close()
	if err := p.Shutdown(ctx); err != nil {
		t.Logf("shutdown: %v", err)
	}
}
