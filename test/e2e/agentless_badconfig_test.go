package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAgentlessBadConfig: a wrong CA, a wrong server name, unreachable
// addresses, a failing exec= command or an expired bearer token each give
// a clear reason on /ready (503) while ferry keeps running and retrying,
// never a crash loop without a reason.
func TestAgentlessBadConfig(t *testing.T) {
	m := alSetup(t)
	unreachable := m.tb.Subnet.Addr().As4()
	unreachable[3] = 250
	tests := []struct {
		name   string
		setup  func(p *alPod)
		args   []string
		reason []string
	}{
		{name: "wrong CA", setup: func(p *alPod) { writeOtherCA(t, filepath.Join(p.Dir, "consul-ca.pem")) },
			reason: []string{"consul servers", "certificate signed by unknown authority"}},
		{name: "wrong server name", args: []string{"-tls-server-name=server.dc9.consul"},
			reason: []string{"consul servers", "server.dc9.consul"}},
		{name: "unreachable addresses", args: []string{"-addresses=" + strings.Join([]string{ipString(unreachable)}, "")},
			reason: []string{"no Consul server answered", ipString(unreachable) + ":8501"}},
		{name: "bad exec command", args: []string{"-addresses=exec=echo no servers here >&2; exit 3"},
			reason: []string{"exit status 3", "no servers here"}},
		{name: "expired token", setup: func(p *alPod) {
			os.WriteFile(filepath.Join(p.Dir, "token"), []byte(m.am.ExpiredToken(t, p.Service)), 0o644)
		}, reason: []string{"consul login", "ferry-k8s-auth-method"}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := m.alPodFor(t, "bad"+string(rune('a'+i)), "svc"+string(rune('a'+i)), nil)
			if tc.setup != nil {
				tc.setup(p)
			}
			pr := m.start(t, p, true, tc.args...)
			var body string
			meshPoll(t, "a 503 naming the reason", 20*time.Second, func() bool {
				var code int
				code, body = meshAdminGet(t, p.Pod, "/ready")
				if code != 503 {
					return false
				}
				for _, r := range tc.reason {
					if !strings.Contains(body, r) {
						return false
					}
				}
				return true
			})
			t.Logf("/ready: %s", strings.TrimSpace(body))
			select {
			case <-pr.Done():
				t.Fatalf("ferry exited:\n%s", pr.Output())
			default:
			}
		})
	}
}

func ipString(a [4]byte) string {
	return strings.Join([]string{itoa(a[0]), itoa(a[1]), itoa(a[2]), itoa(a[3])}, ".")
}

func itoa(b byte) string { return big.NewInt(int64(b)).String() }

// writeOtherCA writes a self-signed CA that signed none of the servers'
// certificates.
func writeOtherCA(t *testing.T, path string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Other CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}
