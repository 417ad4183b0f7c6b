package cni

import (
	"context"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testServer is a TLS API server stand-in; it returns the server and its
// certificate in PEM (the kubeconfig's CA).
func testServer(t *testing.T, h http.Handler) (*httptest.Server, []byte) {
	t.Helper()
	if h == nil {
		h = http.NotFoundHandler()
	}
	srv := httptest.NewTLSServer(h)
	t.Cleanup(srv.Close)
	return srv, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
}

func podAPI(t *testing.T, wantToken string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+wantToken {
			http.Error(w, `{"kind":"Status","code":401}`, http.StatusUnauthorized)
			return
		}
		if r.URL.Path != "/api/v1/namespaces/apps/pods/web" {
			http.Error(w, `{"kind":"Status","code":404}`, http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"apps","annotations":{%q:%q}}}`,
			AnnotationRedirectConfig, testConfigJSON)
	})
}

func TestPodClient(t *testing.T) {
	srv, ca := testServer(t, podAPI(t, "s3cret"))
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "token")
	os.WriteFile(tokFile, []byte("s3cret\n"), 0o600)
	caFile := filepath.Join(dir, "ca.crt")
	os.WriteFile(caFile, ca, 0o644)
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kc := func(cluster, user string) string {
		return fmt.Sprintf("apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n%s\nusers:\n- name: u\n  user:\n%s\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\n", cluster, user)
	}
	server := "    server: " + srv.URL
	caData := "    certificate-authority-data: " + base64.StdEncoding.EncodeToString(ca)

	good := []struct{ name, body string }{
		{"CA data, token", kc(server+"\n"+caData, "    token: s3cret")},
		{"CA file (relative), tokenFile", kc(server+"\n    certificate-authority: ca.crt", "    tokenFile: "+tokFile)},
	}
	for _, c := range good {
		t.Run(c.name, func(t *testing.T) {
			cl, err := LoadKubeconfig(write("kc", c.body))
			if err != nil {
				t.Fatal(err)
			}
			p, err := cl.Pod(context.Background(), "apps", "web")
			if err != nil {
				t.Fatal(err)
			}
			if p.Annotations[AnnotationRedirectConfig] != testConfigJSON {
				t.Fatalf("annotations %v", p.Annotations)
			}
			if _, err := cl.Pod(context.Background(), "apps", "gone"); !errors.Is(err, ErrPodNotFound) {
				t.Fatalf("missing pod: %v", err)
			}
		})
	}

	// A token that rotated in its file is picked up on the next call.
	cl, err := LoadKubeconfig(write("kc", kc(server+"\n"+caData, "    tokenFile: "+tokFile)))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(tokFile, []byte("stale"), 0o600)
	if _, err := cl.Pod(context.Background(), "apps", "web"); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("stale token: %v", err)
	}

	bad := []struct{ name, body, want string }{
		{"unknown CA", kc(server, "    token: s3cret"), ""}, // system roots do not know the test CA: fails at request time
		{"not yaml", "{{", "kubeconfig"},
		{"unknown field", kc(server+"\n    proxy-url: http://x", "    token: s3cret"), "proxy-url"},
		{"no context", strings.Replace(kc(server, ""), "current-context: c", "current-context: nope", 1), "nope"},
		{"bad server", kc("    server: 198.18.0.1:6443", "    token: x"), "server"},
		{"token and tokenFile", kc(server+"\n"+caData, "    token: a\n    tokenFile: b"), "exclusive"},
		{"bad CA data", kc(server+"\n    certificate-authority-data: not*base64", "    token: a"), "base64"},
		{"cert without key", kc(server+"\n"+caData, "    client-certificate: ca.crt"), "together"},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			cl, err := LoadKubeconfig(write("bad", c.body))
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if _, err := cl.Pod(context.Background(), "apps", "web"); err == nil {
					t.Fatal("request with an untrusted server certificate succeeded")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("%v, want %q", err, c.want)
			}
		})
	}
}
