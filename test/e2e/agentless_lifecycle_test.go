package e2e

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestAgentlessLifecycleDuringLogin: while ferry cannot log in (an expired
// bearer token, retried forever), its admin and lifecycle listeners are
// already up and say "not ready" (a native sidecar's startupProbe and
// startup hook get an answer, not a refused connection), and
// /quitquitquit or /graceful_shutdown end the stuck process at once, exit 0.
func TestAgentlessLifecycleDuringLogin(t *testing.T) {
	m := alSetup(t)
	for _, end := range []string{"/quitquitquit", "/graceful_shutdown"} {
		t.Run(end, func(t *testing.T) {
			name := "stuck" + map[string]string{"/quitquitquit": "q", "/graceful_shutdown": "g"}[end]
			p := m.alPodFor(t, name, name, nil)
			if err := os.WriteFile(filepath.Join(p.Dir, "token"), []byte(m.am.ExpiredToken(t, p.Service)), 0o644); err != nil {
				t.Fatal(err)
			}
			pr := m.start(t, p, true)
			meshPoll(t, "admin /ready 503", 20*time.Second, func() bool {
				return podStatus(p.Pod, "127.0.0.1:"+meshAdmin, http.MethodGet, "/ready") == 503
			})
			// consul-k8s passes -startup-grace-period-seconds=0: at once.
			if code := podStatus(p.Pod, "127.0.0.1:20600", http.MethodGet, "/graceful_startup"); code != 503 {
				t.Fatalf("lifecycle /graceful_startup during the login: %d, want 503", code)
			}
			if out, err := p.Pod.Exec(t, testbed.Proc{}, filepath.Join(p.Dir, "consul-dataplane"), "-check-proxy-health"); err == nil {
				t.Fatalf("-check-proxy-health passed during the login: %s", out)
			}
			addr, method := "127.0.0.1:"+meshAdmin, http.MethodPost
			if end == "/graceful_shutdown" {
				addr, method = "127.0.0.1:20600", http.MethodGet
			}
			if code := podStatus(p.Pod, addr, method, end); code != 200 {
				t.Fatalf("%s %s: %d", method, end, code)
			}
			if err := pr.Wait(5 * time.Second); err != nil {
				t.Fatalf("after %s during the login: %v\n%s", end, err, pr.Output())
			}
		})
	}
}

// podStatus sends one request to addr from inside pod; 0 when nothing
// answers.
func podStatus(pod *testbed.Pod, addr, method, path string) int {
	c, err := meshDialIn(pod, addr, time.Second)
	if err != nil {
		return 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", method, path)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}
