package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// BenchmarkStreamPumpTLS is ferry's mTLS pair in one process: client ->
// [Pump TCP->TLS] -> [Pump TLS->TCP] -> server, 1 MiB per op. Whole-process
// cpu-s/GiB includes both ends' crypto, like the bench harness's pair.
//
//	go test -run '^$' -bench 'StreamPumpTLS' -benchtime 2s ./proxy
func BenchmarkStreamPumpTLS(b *testing.B) {
	benchStream(b, func(b *testing.B, a, c net.Conn) {
		srvCfg, cliCfg := selfSignedTLS(b)
		srvCfg.DynamicRecordSizingDisabled = true
		cliCfg.DynamicRecordSizingDisabled = true
		x, y := tcpPair(b)
		tx, ty := tls.Client(newBatchConn(x), cliCfg), tls.Server(newBatchConn(y), srvCfg)
		handshake(b, tx, ty)
		startPump(b, context.Background(), a, tx, time.Minute)
		startPump(b, context.Background(), ty, c, time.Minute)
	})
}
