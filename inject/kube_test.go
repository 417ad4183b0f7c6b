package inject

import (
	"context"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestKubeNamespaces: labels come from GET /api/v1/namespaces/<name> with
// the token as it is in the file at each call (projected tokens rotate);
// any other answer is an error naming the namespace.
func TestKubeNamespaces(t *testing.T) {
	var gotAuth []string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth = append(gotAuth, r.Header.Get("Authorization"))
		switch r.URL.Path {
		case "/api/v1/namespaces/shop":
			w.Write([]byte(`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop","labels":{"consul.hashicorp.com/consul-dns":"false"}}}`))
		case "/api/v1/namespaces/secret":
			http.Error(w, `{"reason":"Forbidden"}`, http.StatusForbidden)
		default:
			w.Write([]byte(`not json`))
		}
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tok, []byte("one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	labels, err := KubeNamespaces(srv.URL, tok, ca)
	if err != nil {
		t.Fatal(err)
	}
	got, err := labels(context.Background(), "shop")
	if err != nil || !reflect.DeepEqual(got, map[string]string{KeyConsulDNS: "false"}) {
		t.Fatalf("shop: %v %v", got, err)
	}
	if err := os.WriteFile(tok, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := labels(context.Background(), "secret"); err == nil || !strings.Contains(err.Error(), "namespace secret") || !strings.Contains(err.Error(), "403") {
		t.Errorf("forbidden: %v", err)
	}
	if _, err := labels(context.Background(), "odd"); err == nil {
		t.Error("a non-JSON answer was accepted")
	}
	if want := []string{"Bearer one", "Bearer two", "Bearer two"}; !reflect.DeepEqual(gotAuth, want) {
		t.Errorf("authorization %q, want %q", gotAuth, want)
	}
	for _, bad := range [][2]string{{"http://127.0.0.1", ca}, {"https://", ca}, {srv.URL, tok}, {srv.URL, filepath.Join(dir, "missing")}} {
		if _, err := KubeNamespaces(bad[0], tok, bad[1]); err == nil {
			t.Errorf("KubeNamespaces(%q, %q) accepted", bad[0], bad[1])
		}
	}
}
