package servers

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestDiscover(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		in      string
		want    string
		wantErr string
	}{
		{in: "10.0.0.1", want: "10.0.0.1:8501"},
		{in: "10.0.0.1, 10.0.0.2 10.0.0.1", want: "10.0.0.1:8501,10.0.0.2:8501"},
		{in: "10.0.0.1:9000,[::1]", want: "10.0.0.1:9000,[::1]:8501"},
		{in: "localhost", want: "127.0.0.1:8501"},
		{in: "exec=echo 10.0.0.3 10.0.0.4; echo 10.0.0.5:7", want: "10.0.0.3:8501,10.0.0.4:8501,10.0.0.5:7"},
		{in: "exec=exit 3", wantErr: "exit status 3"},
		{in: "exec=echo oops >&2; exit 1", wantErr: `"oops"`},
		{in: "exec=echo not-an-ip", wantErr: "not an IP address"},
		{in: "exec=true", wantErr: "printed no addresses"},
		{in: "exec=", wantErr: "empty command"},
		{in: "", wantErr: "no server addresses"},
		{in: "no-such-host.invalid", wantErr: "resolve server address"},
		{in: "10.0.0.1:x", wantErr: "bad port"},
	}
	for _, tc := range tests {
		got, err := Discover(ctx, tc.in, 8501)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		// localhost may also resolve to ::1; keep the IPv4 one.
		if tc.in == "localhost" {
			got = got[:1]
		}
		if strings.Join(got, ",") != tc.want {
			t.Errorf("%q: %v, want %s", tc.in, got, tc.want)
		}
	}
}

// fakeServer is a Consul server stand-in that counts requests and can be
// made to die mid-request.
type fakeServer struct {
	srv  *httptest.Server
	hits atomic.Int64
	hang chan struct{} // when set, requests block on it
	mu   sync.Mutex
}

func newFake(t *testing.T, h http.HandlerFunc) *fakeServer {
	f := &fakeServer{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.hits.Add(1)
		f.mu.Lock()
		hang := f.hang
		f.mu.Unlock()
		if hang != nil {
			<-hang
			// A dying server sends no answer.
			panic(http.ErrAbortHandler)
		}
		h(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeServer) addr() string { return f.srv.Listener.Addr().String() }

func fixed(list ...string) func(context.Context, string, int) ([]string, error) {
	return func(context.Context, string, int) ([]string, error) { return list, nil }
}

func leaderHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Consul-Index", "7")
	json.NewEncoder(w).Encode("leader")
}

func TestPoolFailover(t *testing.T) {
	a := newFake(t, leaderHandler)
	b := newFake(t, leaderHandler)
	p := NewPool(Config{Discover: fixed(a.addr(), b.addr())})
	c, err := p.Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Status().Leader(); err != nil {
		t.Fatal(err)
	}
	if p.Current() != a.addr() || a.hits.Load() != 1 {
		t.Fatalf("current %s, a hits %d", p.Current(), a.hits.Load())
	}

	// A connection lost mid-request (a killed server) moves the request
	// to the next server.
	a.mu.Lock()
	a.hang = make(chan struct{})
	a.mu.Unlock()
	go func() {
		for a.hits.Load() < 2 {
			time.Sleep(time.Millisecond)
		}
		a.srv.CloseClientConnections()
		a.srv.Listener.Close()
		close(a.hang)
	}()
	if _, err := c.Status().Leader(); err != nil {
		t.Fatalf("request during failover: %v", err)
	}
	if p.Current() != b.addr() || p.Failovers() != 1 {
		t.Fatalf("current %s after failover (failovers %d)", p.Current(), p.Failovers())
	}
	// It stays there.
	if _, err := c.Status().Leader(); err != nil || b.hits.Load() != 2 {
		t.Fatalf("err %v, b hits %d", err, b.hits.Load())
	}
}

func TestPoolAllDown(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	var discoveries atomic.Int64
	p := NewPool(Config{Discover: func(context.Context, string, int) ([]string, error) {
		discoveries.Add(1)
		return []string{dead}, nil
	}})
	c, _ := p.Client()
	_, err := c.Status().Leader()
	if err == nil || !strings.Contains(err.Error(), "no Consul server answered") || !strings.Contains(err.Error(), dead) {
		t.Fatalf("error %v", err)
	}
	if p.Err() == nil || p.EverConnected() {
		t.Fatalf("Err %v, ever %v", p.Err(), p.EverConnected())
	}
	if discoveries.Load() != 1 {
		// The forced re-discovery is rate-limited to once a second.
		t.Fatalf("discoveries %d", discoveries.Load())
	}
}

func TestPoolDiscoveryError(t *testing.T) {
	p := NewPool(Config{Addresses: "exec=exit 7"})
	c, _ := p.Client()
	_, err := c.Status().Leader()
	if err == nil || !strings.Contains(err.Error(), "exit status 7") {
		t.Fatalf("error %v", err)
	}
}

// TestLoginRelogin: the token in force is sent; when the server says ACL
// not found for it (deleted), the pool logs in again and retries once;
// Close logs out with the token.
func TestLoginRelogin(t *testing.T) {
	var mu sync.Mutex
	valid := map[string]bool{}
	var logins, logouts int
	var lastMeta map[string]string
	srv := newFake(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		tok := r.Header.Get("X-Consul-Token")
		switch r.URL.Path {
		case "/v1/acl/login":
			var p api.ACLLoginParams
			json.NewDecoder(r.Body).Decode(&p)
			if p.BearerToken != "jwt" || tok != "" {
				w.WriteHeader(403)
				io.WriteString(w, "Permission denied")
				return
			}
			logins++
			lastMeta = p.Meta
			secret := "secret" + string(rune('0'+logins))
			valid[secret] = true
			json.NewEncoder(w).Encode(api.ACLToken{SecretID: secret, AccessorID: "acc" + secret})
		case "/v1/acl/logout":
			logouts++
			delete(valid, tok)
		default:
			if !valid[tok] {
				w.WriteHeader(403)
				io.WriteString(w, "ACL not found")
				return
			}
			leaderHandler(w, r)
		}
	})
	p := NewPool(Config{Discover: fixed(srv.addr())})
	c, _ := p.Client()
	creds := NewCredentials(p, c, "", &Login{AuthMethod: "m", BearerToken: "jwt", Meta: map[string]string{"pod": "ns/a"}}, nil)
	ctx := context.Background()
	if err := creds.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Status().Leader(); err != nil {
		t.Fatal(err)
	}
	if lastMeta["pod"] != "ns/a" {
		t.Fatalf("meta %v", lastMeta)
	}
	// Delete the token under the pool: the next request logs in again.
	// (Back-date the login: a token this new is taken for one the server
	// has not replicated yet.)
	creds.mu.Lock()
	creds.loggedIn = time.Now().Add(-time.Minute)
	creds.mu.Unlock()
	mu.Lock()
	valid = map[string]bool{}
	mu.Unlock()
	if _, err := c.Status().Leader(); err != nil {
		t.Fatalf("after token deletion: %v", err)
	}
	if creds.Logins() != 2 || p.Token() != "secret2" {
		t.Fatalf("logins %d token %q", creds.Logins(), p.Token())
	}
	if err := creds.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if logouts != 1 || valid["secret2"] {
		t.Fatalf("logouts %d valid %v", logouts, valid)
	}
}

func TestLoginFailureIsReported(t *testing.T) {
	srv := newFake(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(403)
		io.WriteString(w, "Permission denied: token expired")
	})
	p := NewPool(Config{Discover: fixed(srv.addr())})
	c, _ := p.Client()
	creds := NewCredentials(p, c, "", &Login{AuthMethod: "m", BearerToken: "jwt"}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := creds.Start(ctx); err == nil {
		t.Fatal("login succeeded")
	}
	if err := creds.Err(); err == nil || !strings.Contains(err.Error(), "token expired") {
		t.Fatalf("Err %v", err)
	}
}
