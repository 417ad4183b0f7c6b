package e2e

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestTunnelHostileFrames: a client with a valid leaf (the frontend's)
// completes mTLS with the backend's sidecar, negotiates the tunnel
// protocol (ALPN ferry/1) and sends malformed frames. Each time the
// sidecar must close that session (promptly, not by an idle timeout), pass
// an abort to the backend app's connection if it had opened one (never a
// clean EOF), say why in its log, and leak nothing, while a verified
// stream from the real frontend through the same sidecar is unaffected.
func TestTunnelHostileFrames(t *testing.T) {
	m := mtSetup(t)
	mtRetry(t, 20*time.Second, func() (string, error) { return meshEchoClient(t, m.frontend, m.vip, 1024, 1) })
	cert := mtLeaf(t, m.tb.Consul.Client, "frontend")
	backend := net.JoinHostPort(m.backend.IP.String(), strconv.Itoa(mtAppPort))

	// Other traffic: a long verified stream through the backend's sidecar.
	streamDone := make(chan error, 1)
	go func() {
		out, err := meshEchoClient(t, m.frontend, m.vip, 64<<20, 1, "-timeout", "120s")
		if err == nil && !strings.HasPrefix(out, "ok conns=1") {
			err = fmt.Errorf("%s", out)
		}
		streamDone <- err
	}()
	fds0 := tfFDs(m.be.PID())
	accepts0 := meshAccepts(m.backendApp)

	open := []byte{2, 0, 0, 0}
	for _, tc := range []struct {
		name   string
		frames []byte
		// how the client ends its side after the frames: "" keeps it open
		// (the frames alone must end the session), "close_notify" or "rst"
		end string
	}{
		{"DATA before OPEN", []byte{0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o'}, ""},
		{"OPEN with a length", []byte{2, 0, 0, 4, 'a', 'b', 'c', 'd'}, ""},
		{"unknown frame type", cat(open, []byte{9, 0, 0, 0}), ""},
		{"EOF with a length", cat(open, []byte{1, 0, 0, 5}, []byte("hello")), ""},
		{"RESET with a length", cat(open, []byte{3, 0, 0, 7}), ""},
		{"OPEN again inside a tunnel (a reused stream)", cat(open, []byte{0, 0, 0, 2, 'h', 'i'}, open), ""},
		{"random bytes after OPEN", cat(open, []byte("\x07\xff\x13\x00GET / HTTP/1.1\r\n\r\n\x00\x00\x00")), ""},
		{"DATA cut short, then close_notify", cat(open, []byte{0, 0, 3, 0xe8}, []byte("only ten b")), "close_notify"},
		{"header cut short, then close_notify", cat(open, []byte{0, 0}), "close_notify"},
		{"a maximal 16 MiB DATA frame cut short by a TCP reset", cat(open, []byte{0, 0xff, 0xff, 0xff}, make([]byte, 100<<10)), "rst"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := meshDialIn(m.outsider, backend, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			c := tls.Client(raw, &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true,
				NextProtos: []string{"ferry/1"}, MinVersion: tls.VersionTLS12})
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := c.Handshake(); err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if p := c.ConnectionState().NegotiatedProtocol; p != "ferry/1" {
				t.Fatalf("negotiated %q, want the tunnel protocol", p)
			}
			if _, err := c.Write(tc.frames); err != nil {
				t.Fatalf("write: %v", err)
			}
			switch tc.end {
			case "close_notify":
				c.CloseWrite()
			case "rst":
				raw.(*net.TCPConn).SetLinger(0)
				raw.Close()
				return
			}
			start := time.Now()
			buf := make([]byte, 4096)
			for {
				if _, err = c.Read(buf); err != nil {
					break
				}
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the sidecar kept the session open for 10 s")
			}
			t.Logf("session ended after %v: %v", time.Since(start).Round(time.Millisecond), err)
		})
	}

	if err := <-streamDone; err != nil {
		t.Errorf("the frontend's verified stream through the same sidecar failed: %v", err)
	}
	select {
	case <-m.be.Done():
		t.Fatalf("the backend's sidecar exited:\n%s", tailLines(m.be.Output(), 30))
	default:
	}
	// Every app connection the hostile tunnels opened ended in an abort.
	opened := meshAccepts(m.backendApp) - accepts0 - 1 // less the stream
	meshPoll(t, "the backend app's connections ended", 10*time.Second, func() bool {
		return strings.Count(m.backendApp.Output(), "\nend ") >= meshAccepts(m.backendApp)
	})
	var clean int
	for _, l := range strings.Split(m.backendApp.Output(), "\n") {
		if strings.HasPrefix(l, "end ") && strings.HasSuffix(l, "err=EOF") {
			clean++
		}
	}
	// The setup probe and the stream end cleanly; nothing else may.
	if clean > 2 {
		t.Errorf("%d of the %d app connections opened by malformed tunnels ended in a clean EOF:\n%s", clean-2, opened, m.backendApp.Output())
	}
	t.Logf("%d app connections opened by the malformed tunnels, all aborted", opened)
	for _, want := range []string{"unexpected frame type"} {
		if !strings.Contains(m.be.Output(), want) {
			t.Errorf("the backend's sidecar log has no %q:\n%s", want, tailLines(m.be.Output(), 40))
		}
	}
	// No leak: the sidecar's fds come back.
	var fds int
	meshPoll(t, "the backend sidecar's fds back to where they were", 15*time.Second, func() bool {
		fds = tfFDs(m.be.PID())
		return fds <= fds0+2
	})
	t.Logf("backend sidecar fds: %d before, %d after", fds0, fds)
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func tfFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}
