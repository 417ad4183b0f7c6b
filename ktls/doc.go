// Package ktls hands TLS 1.3 connections made with crypto/tls to Linux
// kernel TLS (CONFIG_TLS, the "tls" module): after the handshake the
// kernel seals and opens the records, so bytes can be spliced between a
// plain socket and the TLS socket without entering the process. It
// imports nothing else of ferry.
//
// Per connection:
//
//	h := ktls.NewHandoff(tcp, nil)
//	tc := h.Server(cfg)           // or h.Client(cfg): a *tls.Conn over a corked tcp
//	err := tc.HandshakeContext(ctx)
//	k, err := h.Enable(tc)        // or h.Abandon() when the peer did not agree
//	switch {
//	case err == nil:              // use k (a *ktls.Conn); drop tc
//	case ktls.CanFallBack(err):   // use tc: user-space TLS, nothing lost
//	default:                      // close (reset) the connection
//	}
//
// How the kernel starts exactly where crypto/tls stopped:
//   - the cork (cork.go) makes the handshake read one record at a time,
//     so records the peer sent after its Finished stay in the socket;
//   - the connection's own KeyLogWriter captures the application traffic
//     secrets, from which HKDF-Expand-Label derives key and IV (keys.go);
//   - sequence numbers: every record before the handoff was under a
//     handshake key except the server's session tickets, so client TX,
//     client RX and server RX start at 0 and server TX at the number of
//     tickets sent (counted through WrapSession; tickets are off unless
//     Handoff.AllowTickets). TestHandoffSequenceNumbers opens real records
//     at those numbers; the kernel suite reads them back from the kernel.
//
// After the handoff, records that are not application data (alerts,
// tickets, KeyUpdate) make read(2) fail with EIO and splice(2) with
// EINVAL; Conn then reads them with recvmsg: close_notify is io.EOF, a FIN
// without it ErrTruncated, a ticket is skipped, a KeyUpdate is fatal
// (kernels before 6.14 cannot rekey; ferry peers never send one).
//
// The kernel suite (ktls_kernel_test.go) needs a kernel with the tls
// module: test/uml boots this package's test binary as init of a
// User-Mode Linux kernel that has it.
package ktls
