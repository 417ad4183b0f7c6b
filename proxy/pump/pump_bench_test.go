package pump

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// BenchmarkStreamPumpTLS is ferry's mTLS pair in one process: client ->
// [Pump TCP->TLS] -> [Pump TLS->TCP] -> server, 1 MiB per op. Whole-process
// cpu-s/GiB includes both ends' crypto, like the bench harness's pair.
//
//	go test -run '^$' -bench 'StreamPumpTLS' -benchtime 2s ./proxy/pump
func BenchmarkStreamPumpTLS(b *testing.B) {
	benchStream(b, func(b *testing.B, a, c net.Conn) {
		srvCfg, cliCfg := testkit.SelfSignedTLS(b)
		srvCfg.DynamicRecordSizingDisabled = true
		cliCfg.DynamicRecordSizingDisabled = true
		x, y := testkit.TCPPair(b)
		tx, ty := tls.Client(NewBatchConn(x), cliCfg), tls.Server(NewBatchConn(y), srvCfg)
		testkit.Handshake(b, tx, ty)
		startPump(b, context.Background(), a, tx, time.Minute)
		startPump(b, context.Background(), ty, c, time.Minute)
	})
}
