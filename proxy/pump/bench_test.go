package pump

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// Throughput benchmarks: one long-lived connection, 1 MiB per op, compared
// side by side in one run:
//
//	go test -run '^$' -bench 'Stream' -benchtime 2s ./proxy/pump
//
// BenchmarkStreamDirect      client -> server
// BenchmarkStreamPumpSplice  client -> [Pump TCP<->TCP: io.Copy = splice] -> server
// BenchmarkStreamPumpBuffered the same with the legs hidden behind a wrapper,
//                            i.e. the pooled-buffer path TLS legs take
//
// All on loopback, so the ratio measures the proxy hop's cost (an extra
// pair of TCP stacks plus the copy), not a network.

const streamChunk = 1 << 20

func benchStream(b *testing.B, mid func(b *testing.B, a, c net.Conn)) {
	var client, server net.Conn
	if mid == nil {
		client, server = testkit.TCPPair(b)
	} else {
		var a, c net.Conn
		client, a = testkit.TCPPair(b)
		c, server = testkit.TCPPair(b)
		mid(b, a, c)
	}
	got := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, server)
		got <- n
	}()
	buf := make([]byte, streamChunk)
	b.SetBytes(streamChunk)
	b.ReportAllocs()
	cpu0 := processCPU()
	b.ResetTimer()
	for b.Loop() {
		if _, err := client.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	client.(*net.TCPConn).CloseWrite()
	<-got
	b.StopTimer()
	// Whole-process CPU (sender, receiver and pump together) per GiB: the
	// pump's own cost is the difference from BenchmarkStreamDirect.
	gib := float64(b.N) * streamChunk / (1 << 30)
	b.ReportMetric((processCPU()-cpu0).Seconds()/gib, "cpu-s/GiB")
}

// processCPU is this process's user+system CPU time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkStreamDirect(b *testing.B) { benchStream(b, nil) }

func BenchmarkStreamPumpSplice(b *testing.B) {
	benchStream(b, func(b *testing.B, a, c net.Conn) { startPump(b, context.Background(), a, c, time.Minute) })
}

func BenchmarkStreamPumpBuffered(b *testing.B) {
	benchStream(b, func(b *testing.B, a, c net.Conn) {
		startPump(b, context.Background(), hiddenTCP{a.(*net.TCPConn)}, hiddenTCP{c.(*net.TCPConn)}, time.Minute)
	})
}

// hiddenTCP hides the *net.TCPConn type (so no splice) but keeps CloseWrite.
type hiddenTCP struct{ *net.TCPConn }

func (h hiddenTCP) Read(p []byte) (int, error)  { return h.TCPConn.Read(p) }
func (h hiddenTCP) Write(p []byte) (int, error) { return h.TCPConn.Write(p) }

// hiddenTCP must not expose ReadFrom/WriteTo, or io.Copy would splice after all.
var _ interface{ CloseWrite() error } = hiddenTCP{}

// TestPumpSplices proves the TCP<->TCP path moves data with splice(2) and
// not read/write: a child process that does nothing but accept one
// connection, dial one and Pump between them runs under `strace -f -c`,
// while this process sends 16 MiB each way through it. Evidence from a run:
//
//	splice   266 calls (socket->pipe and pipe->socket, <= 256 KiB each)
//	read 9, write 2 (process setup only)
//
// where a user-space copy with 32 KiB buffers would need >= 1,024 of each.
func TestPumpSplices(t *testing.T) {
	if os.Getenv("FERRY_SPLICE_CHILD") != "" {
		spliceChild(t, os.Getenv("FERRY_SPLICE_CHILD"))
		return
	}
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Skip("strace not installed")
	}
	if testing.Short() {
		t.Skip("re-runs the test binary under strace")
	}
	const total = 16 << 20
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	cmd := exec.Command(strace, "-f", "-c", "-e", "trace=splice,read,write,recvfrom,sendto,readv,writev",
		os.Args[0], "-test.run=^TestPumpSplices$", "-test.count=1")
	cmd.Env = append(os.Environ(), "FERRY_SPLICE_CHILD="+sink.Addr().String())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(stdout)
	var addr string
	for sc.Scan() {
		if a, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
			addr = a
			break
		}
	}
	if addr == "" {
		cmd.Wait()
		if strings.Contains(stderr.String(), "ptrace") {
			t.Skipf("strace cannot trace here: %s", stderr.String())
		}
		t.Fatalf("child did not start: %s", stderr.String())
	}
	go io.Copy(io.Discard, stdout)

	client, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := sink.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	done := make(chan int64, 2)
	for _, c := range []net.Conn{client, server} {
		go func() {
			io.Copy(c, io.LimitReader(zeroReader{}, total))
			c.(*net.TCPConn).CloseWrite()
		}()
		go func() { n, _ := io.Copy(io.Discard, c); done <- n }()
	}
	for range 2 {
		if n := <-done; n != total {
			t.Fatalf("got %d bytes through the child pump, want %d", n, total)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v\n%s", err, stderr.String())
	}
	calls := straceCalls(stderr.String())
	t.Logf("child syscalls under strace -f -c: %v", calls)
	if calls["splice"] < 2*total/(1<<20) {
		t.Fatalf("splice calls = %d; want >= %d\n%s", calls["splice"], 2*total/(1<<20), stderr.String())
	}
	userCopies := calls["read"] + calls["write"] + calls["recvfrom"] + calls["sendto"] + calls["readv"] + calls["writev"]
	if userCopies > 100 {
		t.Fatalf("%d read/write calls in the pump process: data went through user space\n%s", userCopies, stderr.String())
	}
}

// spliceChild accepts one connection, dials sinkAddr and pumps between them.
func spliceChild(t *testing.T, sinkAddr string) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fmt.Printf("listening %s\n", ln.Addr())
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	b, err := net.Dial("tcp", sinkAddr)
	if err != nil {
		t.Fatal(err)
	}
	if st := Pump(context.Background(), a, b, time.Minute); st.Err != nil {
		t.Fatal(st.Err)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

var straceLine = regexp.MustCompile(`^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$`)

// straceCalls parses `strace -c` output into syscall -> calls.
func straceCalls(out string) map[string]int {
	m := map[string]int{}
	for _, line := range strings.Split(out, "\n") {
		if g := straceLine.FindStringSubmatch(line); g != nil {
			n, _ := strconv.Atoi(g[1])
			m[g[2]] = n
		}
	}
	return m
}
