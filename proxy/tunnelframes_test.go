package proxy

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/tunnel"
)

// A malformed frame from a tunnel peer aborts the app connection the
// tunnel opened: the app reads a reset, never a clean EOF, also when it
// had read nothing yet.
func TestMalformedTunnelFrameResetsApp(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frames []byte
	}{
		{"unknown frame type", []byte{9, 0, 0, 0}},
		{"EOF with a length", []byte{1, 0, 0, 5, 'h', 'e', 'l', 'l', 'o'}},
		{"RESET with a length", []byte{3, 0, 0, 7}},
		{"OPEN inside a tunnel", []byte{0, 0, 0, 2, 'h', 'i', 2, 0, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			cs, ss := sessionPair(t)
			if _, err := cs.Write(append([]byte{2, 0, 0, 0}, tc.frames...)); err != nil {
				t.Fatal(err)
			}
			if err := tunnel.ReadOpen(ss); err != nil {
				t.Fatal(err)
			}
			down := tunnel.NewConn(ss, func(clean bool) {
				if !clean {
					ss.Close()
				}
			})
			b, serverApp := testkit.TCPPair(t)
			run := startPump(t, context.Background(), down, b, time.Minute)
			if err := readUntilErr(t, serverApp, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("app read %v after a malformed frame; want ECONNRESET", err)
			}
			if st := run.Wait(t, 5*time.Second); st.Err == nil {
				t.Errorf("pump ended without an error: %+v", st)
			}
		})
	}
}
