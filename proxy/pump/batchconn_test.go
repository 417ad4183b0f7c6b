package pump

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// The mesh pair: client -> [Pump TCP<->TLS] -> [Pump TLS<->TCP] -> server,
// TLS legs over BatchConn as in production. Large streams both ways at once
// (multi-record writes batched while the reverse direction reads), then a
// half-close each way.
func TestPumpTLSPairBatchedBothWays(t *testing.T) {
	testkit.CheckLeaks(t)
	n := int64(32 << 20)
	if testing.Short() {
		n = 4 << 20
	}
	srvCfg, cliCfg := testkit.SelfSignedTLS(t)
	client, a := testkit.TCPPair(t)
	c, server := testkit.TCPPair(t)
	x, y := testkit.TCPPair(t)
	tx, ty := tls.Client(NewBatchConn(x), cliCfg), tls.Server(NewBatchConn(y), srvCfg)
	testkit.Handshake(t, tx, ty)
	if batcherOf(tx) == nil || batcherOf(passThrough{tx}) == nil || NewReadWaiter(passThrough{tx}) == nil {
		t.Fatal("BatchConn under tls.Conn not recognised")
	}
	runA := startPump(t, context.Background(), a, tx, time.Minute)
	runB := startPump(t, context.Background(), ty, c, time.Minute)

	testkit.ExchangeBothWays(t, client, server, n)
	for _, r := range []*pumpRun{runA, runB} {
		if st := r.Wait(t, 10*time.Second); st.Err != nil || st.Sent != n || st.Received != n {
			t.Fatalf("stats %+v; want %d each way", st, n)
		}
	}
}
