package main

// Hostile clients, run inside the pods: `reliability hostile -kind K -addr A`.
// Each attempt is one connection (or datagram) of bad input; the result line
// counts how the far side answered. The harness judges ferry, not these
// counts: ferry must stay up, keep its fds and memory, and keep serving the
// other traffic.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var hostileKinds = []string{"tls-garbage", "tls-truncated", "tls-oversized", "tls-no-cert", "tunnel-frames", "random", "protocols", "admin", "dns-udp", "dns-tcp", "slowloris", "slow-reader"}

type hostileResult struct {
	Kind      string `json:"kind"`
	Attempts  int64  `json:"attempts"`
	Refused   int64  `json:"refused"`   // could not connect
	Closed    int64  `json:"closed"`    // the far side closed or reset
	Answered  int64  `json:"answered"`  // the far side sent something
	TimedOut  int64  `json:"timed_out"` // nothing within the deadline
	Status    map[int]int64
	BytesSent int64  `json:"bytes_sent"`
	FirstErr  string `json:"first_dial_error,omitempty"`
}

func hostileMain(args []string) error {
	fs := flag.NewFlagSet("hostile", flag.ContinueOnError)
	kind := fs.String("kind", "", "one of "+strings.Join(hostileKinds, ","))
	addr := fs.String("addr", "", "target address")
	n := fs.Int("n", 200, "attempts (slowloris: connections held)")
	parallel := fs.Int("parallel", 16, "attempts at once")
	hold := fs.Duration("hold", 5*time.Second, "slowloris and slow-reader: how long to hold")
	certFile := fs.String("cert", "", "tunnel-frames: a leaf certificate (PEM) the peer trusts")
	keyFile := fs.String("key", "", "tunnel-frames: its private key (PEM)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var leaf []tls.Certificate
	if *certFile != "" {
		c, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			return err
		}
		leaf = []tls.Certificate{c}
	}
	raiseNofile()
	res := hostileResult{Kind: *kind, Status: map[int]int64{}}
	var mu sync.Mutex
	var attempts, refused, closed, answered, timedOut, sent atomic.Int64
	note := func(c net.Conn) {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 4096)
		n, err := c.Read(b)
		switch {
		case n > 0:
			answered.Add(1)
		case err != nil && isTimeout(err):
			timedOut.Add(1)
		default:
			closed.Add(1)
		}
	}
	dial := func() net.Conn {
		attempts.Add(1)
		c, err := net.DialTimeout("tcp", *addr, 3*time.Second)
		if err != nil {
			if refused.Add(1) == 1 {
				mu.Lock()
				res.FirstErr = err.Error()
				mu.Unlock()
			}
			return nil
		}
		return c
	}
	send := func(c net.Conn, b []byte) {
		c.SetWriteDeadline(time.Now().Add(2 * time.Second))
		n, _ := c.Write(b)
		sent.Add(int64(n))
	}
	one := func(i int) {
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		switch *kind {
		case "tls-garbage", "random":
			if c := dial(); c != nil {
				b := make([]byte, 1+rng.IntN(8192))
				for j := range b {
					b[j] = byte(rng.Uint32())
				}
				send(c, b)
				note(c)
				c.Close()
			}
		case "tls-truncated":
			if c := dial(); c != nil {
				h := clientHello(rng)
				send(c, h[:rng.IntN(len(h))])
				if rng.IntN(2) == 0 {
					c.(*net.TCPConn).CloseWrite()
				}
				note(c)
				c.Close()
			}
		case "tls-oversized":
			if c := dial(); c != nil {
				// A record header claiming 16 MiB - 1 and a handshake
				// header claiming more, then a stream of filler.
				h := []byte{0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff}
				send(c, h)
				filler := make([]byte, 64<<10)
				for range 16 {
					send(c, filler)
				}
				note(c)
				c.Close()
			}
		case "tls-no-cert":
			// A well-formed TLS client without a certificate.
			if c := dial(); c != nil {
				tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, ServerName: "x"})
				tc.SetDeadline(time.Now().Add(3 * time.Second))
				if err := tc.Handshake(); err == nil {
					tc.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
					note(tc)
				} else {
					closed.Add(1)
				}
				c.Close()
			}
		case "tunnel-frames":
			// An authenticated peer (a valid leaf) that negotiates the
			// tunnel protocol and then breaks it.
			if c := dial(); c != nil {
				tc := tls.Client(c, &tls.Config{Certificates: leaf, InsecureSkipVerify: true, NextProtos: []string{"ferry/1"}})
				tc.SetDeadline(time.Now().Add(3 * time.Second))
				if err := tc.Handshake(); err != nil || tc.ConnectionState().NegotiatedProtocol != "ferry/1" {
					closed.Add(1)
					c.Close()
					return
				}
				f := badFrames[i%len(badFrames)]
				tc.SetDeadline(time.Time{})
				send(tc, f.b)
				switch f.end {
				case "close_notify":
					tc.CloseWrite()
				case "rst":
					c.(*net.TCPConn).SetLinger(0)
					c.Close()
					closed.Add(1)
					return
				}
				note(tc)
				c.Close()
			}
		case "protocols":
			if c := dial(); c != nil {
				msgs := []string{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "SSH-2.0-OpenSSH_9.0\r\n",
					"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", "*1\r\n$4\r\nPING\r\n", "\x00\x00\x00\x08\x04\xd2\x16\x2f"}
				send(c, []byte(msgs[i%len(msgs)]))
				note(c)
				c.Close()
			}
		case "admin":
			methods := []string{"POST", "DELETE", "PUT", "TRACE", "CONNECT", "GET", "BREW", "OPTIONS"}
			paths := []string{"/", "/ready/../metrics", "/metrics?x=" + strings.Repeat("A", 8000), "/%00", "//ready", "/debug/pprof/", "/ready", "*"}
			if c := dial(); c != nil {
				req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", methods[i%len(methods)], paths[(i/len(methods))%len(paths)], rng.IntN(10))
				if i%5 == 0 {
					req = string(randBytes(rng, 512)) + "\r\n\r\n"
				}
				send(c, []byte(req))
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				b, _ := io.ReadAll(io.LimitReader(c, 1<<16))
				if f := strings.Fields(string(b)); len(f) > 1 && strings.HasPrefix(f[0], "HTTP/") {
					var code int
					fmt.Sscan(f[1], &code)
					mu.Lock()
					res.Status[code]++
					mu.Unlock()
					answered.Add(1)
				} else {
					closed.Add(1)
				}
				c.Close()
			}
		case "dns-udp":
			attempts.Add(1)
			c, err := net.Dial("udp", *addr)
			if err != nil {
				refused.Add(1)
				return
			}
			b := dnsGarbage(rng, 512)
			sent.Add(int64(len(b)))
			c.Write(b)
			note(c)
			c.Close()
		case "dns-tcp":
			if c := dial(); c != nil {
				b := dnsGarbage(rng, 1024)
				var frame []byte
				switch i % 3 {
				case 0: // correct length prefix, garbage message
					frame = binary.BigEndian.AppendUint16(nil, uint16(len(b)))
				case 1: // length prefix promising more than comes
					frame = binary.BigEndian.AppendUint16(nil, 65535)
				default: // no length prefix at all
				}
				send(c, append(frame, b...))
				note(c)
				c.Close()
			}
		}
	}
	switch *kind {
	case "slowloris":
		// n connections that send one byte of a TLS record and then
		// nothing, held open.
		var conns []net.Conn
		for range *n {
			if c := dial(); c != nil {
				send(c, []byte{0x16})
				conns = append(conns, c)
			}
		}
		fmt.Printf("holding %d\n", len(conns))
		time.Sleep(*hold)
		for _, c := range conns {
			// Not time.Now(): a deadline already past fails the read
			// without looking at the socket.
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			var b [1]byte
			if _, err := c.Read(b[:]); err != nil && !isTimeout(err) {
				closed.Add(1)
			}
			c.Close()
		}
	case "slow-reader":
		// n connections to an echo app that write continuously and never
		// read: the proxies' buffers fill and must stay bounded.
		var conns []net.Conn
		var wg sync.WaitGroup
		for range *n {
			// Paced: a burst of new connections from one pod overruns the
			// server-side sidecar's per-source handshake budget, which
			// the concurrency scenario reports; this one is about buffers.
			time.Sleep(20 * time.Millisecond)
			if c := dial(); c != nil {
				conns = append(conns, c)
				wg.Add(1)
				go func() {
					defer wg.Done()
					b := make([]byte, 64<<10)
					c.SetWriteDeadline(time.Now().Add(*hold))
					for {
						n, err := c.Write(b)
						sent.Add(int64(n))
						if err != nil {
							return
						}
					}
				}()
			}
		}
		fmt.Printf("holding %d\n", len(conns))
		wg.Wait()
		for _, c := range conns {
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	default:
		ctx := context.Background()
		sem := make(chan struct{}, *parallel)
		var wg sync.WaitGroup
		for i := range *n {
			if ctx.Err() != nil {
				break
			}
			sem <- struct{}{}
			wg.Add(1)
			go func() { defer func() { <-sem; wg.Done() }(); one(i) }()
		}
		wg.Wait()
	}
	res.Attempts, res.Refused, res.Closed, res.Answered, res.TimedOut, res.BytesSent = attempts.Load(), refused.Load(), closed.Load(), answered.Load(), timedOut.Load(), sent.Load()
	b, _ := json.Marshal(res)
	fmt.Printf("result %s\n", b)
	return nil
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func randBytes(rng *rand.Rand, max int) []byte {
	b := make([]byte, 1+rng.IntN(max))
	for j := range b {
		b[j] = byte(rng.Uint32())
	}
	return b
}

// dnsGarbage is a DNS message that is valid for some bytes and garbage
// after: a plausible header with absurd counts, or pure noise.
func dnsGarbage(rng *rand.Rand, max int) []byte {
	b := randBytes(rng, max)
	if len(b) >= 12 && rng.IntN(2) == 0 {
		binary.BigEndian.PutUint16(b[2:], 0x0100) // a query, RD
		binary.BigEndian.PutUint16(b[4:], uint16(rng.IntN(5)))
		binary.BigEndian.PutUint16(b[6:], 0xffff)
	}
	return b
}

// clientHello is a real TLS ClientHello (what crypto/tls sends), for
// truncating at random points.
func clientHello(rng *rand.Rand) []byte {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		tls.Client(a, &tls.Config{ServerName: fmt.Sprintf("h%d.example", rng.IntN(100)), NextProtos: []string{"h2", "x"}}).Handshake()
	}()
	b.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 4096)
	n, _ := b.Read(buf)
	if n < 2 {
		return []byte{0x16, 0x03, 0x01}
	}
	return buf[:n]
}

// badFrames are malformed proxy/tunnel sessions after the handshake (a
// frame is type, 24-bit length, payload; OPEN is type 2, DATA 0, EOF 1,
// RESET 3). end says how the client then ends: "" leaves it to ferry.
var badFrames = func() []struct {
	b   []byte
	end string
} {
	open := []byte{2, 0, 0, 0}
	cat := func(ps ...[]byte) []byte {
		var out []byte
		for _, p := range ps {
			out = append(out, p...)
		}
		return out
	}
	return []struct {
		b   []byte
		end string
	}{
		{[]byte{0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o'}, ""},                        // DATA before OPEN
		{[]byte{2, 0, 0, 4, 'a', 'b', 'c', 'd'}, ""},                             // OPEN with a length
		{cat(open, []byte{9, 0, 0, 0}), ""},                                      // unknown type
		{cat(open, []byte{1, 0, 0, 5}, []byte("hello")), ""},                     // EOF with a length
		{cat(open, []byte{3, 0, 0, 7}), ""},                                      // RESET with a length
		{cat(open, []byte{0, 0, 0, 2, 'h', 'i'}, open), ""},                      // OPEN inside a tunnel
		{cat(open, []byte{0, 0, 3, 0xe8}, []byte("ten bytes!")), "close_notify"}, // DATA cut short
		{cat(open, []byte{0, 0}), "close_notify"},                                // header cut short
		{cat(open, []byte{0, 0xff, 0xff, 0xff}, make([]byte, 64<<10)), "rst"},    // maximal frame, then RST
	}
}()

// leafFiles writes the agent's current leaf for service to PEM files and
// returns the hostile client's flags for them, and what removes them.
func (e *env) leafFiles(service string) ([]string, func(), error) {
	leaf, _, err := e.tb.Consul.Client.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		return nil, nil, err
	}
	dir, err := os.MkdirTemp("", "ferry-rel-leaf-")
	if err != nil {
		return nil, nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, []byte(leaf.CertPEM), 0o600); err != nil {
		cleanup()
		return nil, nil, err
	}
	if err := os.WriteFile(key, []byte(leaf.PrivateKeyPEM), 0o600); err != nil {
		cleanup()
		return nil, nil, err
	}
	return []string{"-cert", cert, "-key", key}, cleanup, nil
}
