package e2e

import (
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestAgentlessMesh: frontend -> backend by virtual IP through two ferry
// sidecars started with consul-k8s's consul-dataplane command line,
// registered in the catalog only, logged in through the auth method, on
// the three-server TLS+ACL cluster; default deny, then allow.
func TestAgentlessMesh(t *testing.T) {
	m := alSetup(t)
	fe := m.alPodFor(t, "frontend", "frontend", nil)
	be := m.alPodFor(t, "backend", "backend", nil)
	app := meshEchoServer(t, be.Pod, "backend app", "127.0.0.1:8080")
	m.start(t, fe, false)
	m.start(t, be, false)
	vip := m.vip(t, "backend")

	t.Run("default deny", func(t *testing.T) {
		out, err := meshEchoClient(t, fe.Pod, vip, 1024, 1, "-timeout", "5s")
		if err == nil {
			t.Fatalf("connection allowed without an intention:\n%s", out)
		}
		if n := meshAccepts(app); n != 0 {
			t.Fatalf("backend app accepted %d connections", n)
		}
	})
	t.Run("allow", func(t *testing.T) {
		m.c.SetIntention(t, "frontend", "backend", api.IntentionActionAllow)
		meshPoll(t, "allowed connection", 15e9, func() bool {
			_, err := meshEchoClient(t, fe.Pod, vip, 1024, 1, "-timeout", "5s")
			return err == nil
		})
		if out, err := meshEchoClient(t, fe.Pod, vip, 64<<10, 4); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	t.Run("login token meta", func(t *testing.T) {
		toks, _, err := m.c.Client.ACL().TokenList(nil)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, tk := range toks {
			if tk.AuthMethod == m.am.Name && strings.Contains(tk.Description, `"pod-uid":"`+fe.UID+`"`) &&
				strings.Contains(tk.Description, `"pod":"default/frontend"`) {
				found = true
			}
		}
		if !found {
			t.Fatalf("no login token with the frontend's pod meta among %d tokens", len(toks))
		}
	})
}
