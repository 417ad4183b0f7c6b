package proxy

import (
	"context"
	"crypto/tls"
	"testing"
	"time"
)

// The mesh pair: client -> [Pump TCP<->TLS] -> [Pump TLS<->TCP] -> server,
// TLS legs over batchConn as in production. Large streams both ways at once
// (multi-record writes batched while the reverse direction reads), then a
// half-close each way.
func TestPumpTLSPairBatchedBothWays(t *testing.T) {
	checkLeaks(t)
	n := int64(32 << 20)
	if testing.Short() {
		n = 4 << 20
	}
	srvCfg, cliCfg := selfSignedTLS(t)
	client, a := tcpPair(t)
	c, server := tcpPair(t)
	x, y := tcpPair(t)
	tx, ty := tls.Client(newBatchConn(x), cliCfg), tls.Server(newBatchConn(y), srvCfg)
	handshake(t, tx, ty)
	if batcherOf(tx) == nil || batcherOf(passThrough{tx}) == nil || newReadWaiter(passThrough{tx}) == nil {
		t.Fatal("batchConn under tls.Conn not recognised")
	}
	runA := startPump(t, context.Background(), a, tx, time.Minute)
	runB := startPump(t, context.Background(), ty, c, time.Minute)

	exchangeBothWays(t, client, server, n)
	for _, r := range []*pumpRun{runA, runB} {
		if st := r.wait(t, 10*time.Second); st.Err != nil || st.Sent != n || st.Received != n {
			t.Fatalf("stats %+v; want %d each way", st, n)
		}
	}
}
