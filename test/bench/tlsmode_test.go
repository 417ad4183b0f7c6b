package main

import (
	"bufio"
	"strings"
	"testing"
)

// The bench reads each ferry path's TLS mode from the sidecars' counter.
func TestParseTLSModes(t *testing.T) {
	metrics := `# HELP ferry_mesh_tls_sessions_total mTLS sessions established.
# TYPE ferry_mesh_tls_sessions_total counter
ferry_mesh_tls_sessions_total{direction="inbound",mode="ktls"} 3
ferry_mesh_tls_sessions_total{direction="outbound",mode="ktls"} 4
ferry_mesh_tls_sessions_total{direction="outbound",mode="fallback"} 1
ferry_connections_total{direction="inbound",outcome="ok"} 9
`
	m, err := parseTLSModes(bufio.NewScanner(strings.NewReader(metrics)))
	if err != nil || m["ktls"] != 7 || m["fallback"] != 1 || m["userspace"] != 0 {
		t.Fatalf("modes %v, %v", m, err)
	}
	for _, tc := range []struct {
		m    map[string]int64
		want string
	}{
		{map[string]int64{"ktls": 7}, "ktls (7 sessions, both sidecars)"},
		{map[string]int64{"ktls": 7, "fallback": 1, "userspace": 0}, "fallback 1, ktls 7 sessions (both sidecars)"},
		{map[string]int64{}, "no mTLS session counted"},
	} {
		if got := describeModes(tc.m); got != tc.want {
			t.Errorf("describeModes(%v) = %q, want %q", tc.m, got, tc.want)
		}
	}
}
