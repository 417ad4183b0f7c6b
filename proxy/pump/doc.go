// Package pump moves the bytes of one proxied connection: Pump copies
// between two legs, both directions at once, with real half-close, aborts
// passed on as aborts, and an idle timeout. It is where every byte ferry
// carries is copied.
//
// What it owns:
//   - Pump and its Stats (pump.go): two goroutines per connection; EOF on
//     one side becomes CloseWrite on the other (for *tls.Conn close_notify,
//     then FIN on the TCP under it); an error aborts both legs (TCP reset,
//     TLS reset under the TLS layer, an Aborter's own way).
//   - the splice path (splice.go): socket to socket through pipes held only
//     while data moves, from a pool that respects the UID's pipe budget:
//     TCP→TCP, and to and from a KernelTLS leg's socket (a *ktls.Conn,
//     whose records the kernel seals and opens; legs.go). SpliceChunk and
//     SpliceChunkAfter lend the same pipes to a FrameSplicer leg (a tunnel
//     over a kernel TLS session), which splices its frames' payloads
//     itself.
//   - the buffered path (pump.go): pooled 64 KiB buffers, 256 KiB while
//     streaming, none while idle (GetBuffer and PutBuffer lend them out).
//   - batched TLS writes (batchconn.go): BatchConn under a *tls.Conn sends
//     several records in one write(2).
//   - the read wait (readwait.go): ReadWaiter parks on the socket without a
//     buffer, and takes what crypto/tls already holds first.
//   - the idle watchdog (idle.go), read from kernel byte counters.
//
// Legs it knows by behaviour, not by type: Framed (a source that delivers
// its stream in frames over a session, e.g. proxy/tunnel's tunnels; never
// spliced as the session under it), FrameSplicer (a framed leg that
// splices its payloads itself) and Aborter (a leg that aborts its own way). Both are found through NetConn()
// pass-through wrappers (TCPOf walks the same chain).
//
// Rules: pump imports nothing of ferry's (only the standard library and
// golang.org/x/sys), keeps no metrics and no logger (callers count Stats),
// and holds no state beyond its buffer and pipe pools, which are per
// process because the kernel's pipe budget is per user. The import rules
// are checked by internal/archtest.
package pump
