package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/test/dockerenv"
	"github.com/ferrymesh/ferry/test/testbed"
)

// The example's fixed addresses (examples/compose/compose.yaml).
const (
	composeSubnet   = "198.19.42.0/24"
	composeConsul   = "198.19.42.2"
	composeFrontend = "198.19.42.10"
	composeBackend  = "198.19.42.20"
	composeProject  = "ferry-compose-test"
)

// TestCompose runs the docker compose example for real: ferry's images built
// from the Dockerfile (offline: base images made locally), a Docker Engine of
// the test's own, Consul and two meshed apps. The frontend's calls must reach
// the backend through both sidecars over mTLS, a container outside the mesh
// must be refused, an intention deny must stop the calls within 2 s, and
// `docker compose down` must leave nothing behind.
//
// Cost: the first run on a machine debootstraps Debian (~1-2 min), builds
// Docker Compose (~3-5 min) and the images; later runs reuse .cache (the
// engine's data root, the compose binary, the base root filesystem) and take
// well under a minute for images plus the mesh.
func TestCompose(t *testing.T) {
	testbed.RequireRoot(t)
	if testing.Short() {
		t.Skip("compose: builds images and runs a Docker Engine; skipped in -short")
	}
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	t.Cleanup(cancel)
	phase := time.Now()
	lap := func(what string) {
		t.Logf("timing: %s: %v", what, time.Since(phase).Round(100*time.Millisecond))
		phase = time.Now()
	}

	d, err := dockerenv.Start(ctx, root, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Error(err)
		}
	})
	lap("engine")
	// Compose builds (Go) while the images build (mostly debootstrap and
	// the engine) on a cold machine.
	type built struct {
		path string
		err  error
	}
	composeDone := make(chan built, 1)
	go func() {
		p, err := dockerenv.ComposeBinary(ctx, root, t.Logf)
		composeDone <- built{p, err}
	}()
	if err := d.BuildImages(ctx, testbed.ConsulBinary(t), t.Logf); err != nil {
		<-composeDone
		t.Fatal(err)
	}
	lap("images")
	cb := <-composeDone
	if cb.err != nil {
		t.Fatal(cb.err)
	}
	composeBin := cb.path
	lap("compose binary (after images)")
	for _, img := range []string{dockerenv.SidecarImage, dockerenv.InitImage, dockerenv.AppImage, dockerenv.ConsulImage} {
		n, err := d.ImageSize(ctx, img)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("image %-30s %s", img, dockerenv.FormatSize(n))
		if img == dockerenv.SidecarImage && n > 30e6 {
			t.Errorf("sidecar image is %s: more than the static binary alone", dockerenv.FormatSize(n))
		}
	}

	t.Run("SidecarImage", func(t *testing.T) { checkSidecarImage(t, ctx, d) })

	c := &dockerenv.Compose{
		D: d, Binary: composeBin, Project: composeProject,
		File: filepath.Join(root, "examples", "compose", "compose.yaml"),
		// Ephemeral host ports: a developer's own 8500/8080 stay free.
		Env: []string{"FERRY_CONSUL_PORT=", "FERRY_FRONTEND_PORT="},
	}
	if _, err := c.Run(ctx, "config", "--quiet"); err != nil {
		t.Fatalf("docker compose config: %v", err)
	}
	if nets := composeNetworks(t, ctx, d, composeSubnet); len(nets) > 0 {
		t.Fatalf("the example's network %s is in use by %v (is `make compose-up` running? `make compose-down` first)", composeSubnet, nets)
	}
	if addrs, _ := testbed.MustCommand(t, "ip", "-4", "-o", "addr").Output(); strings.Contains(string(addrs), " 198.19.42.") {
		t.Fatalf("an interface on this host already uses %s (a testbed bridge?):\n%s", composeSubnet, addrs)
	}
	before := composeHostState(t, ctx, d)

	downDone := false
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.Run(context.Background(), "logs", "--no-color", "--tail", "40")
			t.Logf("compose logs:\n%s", out)
		}
		if !downDone {
			c.Run(context.Background(), "down", "--remove-orphans", "--timeout", "3")
		}
	})
	if _, err := c.Run(ctx, "up", "--detach"); err != nil {
		t.Fatal(err)
	}
	lap("compose up")

	front := "http://" + composeFrontend + ":8080/"
	body := composeWait(t, 90*time.Second, func() (string, error) { return composeGet(front) })
	if !strings.Contains(body, "frontend got: hello from backend") {
		t.Fatalf("frontend answered %q", body)
	}
	lap("first call through the mesh")

	// The init container installed the rules in the pod's namespace and
	// exited; the sidecar runs as 5995 in that namespace.
	for _, pod := range []string{"frontend", "backend"} {
		pid := composePID(t, ctx, d, pod)
		out, err := testbed.MustCommand(t, "nsenter", "-t", strconv.Itoa(pid), "-n", "iptables-save", "-t", "nat").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save in %s: %v\n%s", pod, err, out)
		}
		for _, want := range []string{"-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND", "CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001", "--to-destination 127.0.0.1:8600"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("%s's namespace lacks %q:\n%s", pod, want, out)
			}
		}
		state, _ := d.Output(ctx, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", composeProject+"-"+pod+"-init-1")
		if strings.TrimSpace(state) != "exited 0" {
			t.Errorf("%s-init: %q, want exited 0", pod, state)
		}
		if uid := composeUID(t, composePID(t, ctx, d, pod+"-sidecar")); uid != "5995" {
			t.Errorf("%s-sidecar runs as UID %s, want 5995", pod, uid)
		}
	}

	// Through both sidecars over mTLS: the frontend's ferry dialed the
	// backend over TLS, the backend's ferry accepted it from the frontend.
	for i := 0; i < 5; i++ {
		if _, err := composeGet(front); err != nil {
			t.Fatal(err)
		}
	}
	fm := composeMetrics(t, composeFrontend)
	bm := composeMetrics(t, composeBackend)
	if n := composeSum(fm, "ferry_outbound_tls_handshakes_total"); n < 1 {
		t.Errorf("frontend sidecar: no outbound mTLS handshakes\n%s", composeGrep(fm, "ferry_outbound"))
	}
	// The frontend app keeps its connection to the backend alive, so it may
	// still be open (active) or already counted (closed).
	if n := composeSum(bm, `ferry_active_connections{direction="inbound"}`) + composeSum(bm, `ferry_connections_total{direction="inbound",outcome="ok"}`); n < 1 {
		t.Errorf("backend sidecar: no inbound connection\n%s", composeGrep(bm, "inbound"))
	}

	// A container outside the mesh, on the same network: the frontend's
	// excluded port 8080 answers it in plain HTTP (so it can reach the pods),
	// the backend's port 8080 belongs to ferry and refuses plain TCP.
	mesh := composeProject + "_mesh"
	outsider := func(url string) (string, error) {
		return d.Output(ctx, "run", "--rm", "--network", mesh, dockerenv.AppImage, "-get", url, "-timeout", "3s")
	}
	if out, err := outsider(front); err != nil || !strings.Contains(out, "hello from backend") {
		t.Fatalf("outsider to the frontend's plain port: %q, %v", out, err)
	}
	if out, err := outsider("http://" + composeBackend + ":8080/"); err == nil {
		t.Fatalf("outsider reached the backend in plain HTTP: %q", out)
	} else {
		t.Logf("outsider to the backend, refused as it should be: %v", err)
	}
	lap("checks")

	// Deny: the frontend's calls must fail within 2 s, its established
	// keep-alive connection included.
	consul, err := api.NewClient(&api.Config{Address: composeConsul + ":8500"})
	if err != nil {
		t.Fatal(err)
	}
	setIntention := func(action api.IntentionAction) {
		t.Helper()
		ok, _, err := consul.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
			Kind: api.ServiceIntentions, Name: "backend",
			Sources: []*api.SourceIntention{
				{Name: "frontend", Action: action},
				{Name: "*", Action: api.IntentionActionDeny},
			},
		}, nil)
		if err != nil || !ok {
			t.Fatalf("write intention: %v %v", ok, err)
		}
	}
	setIntention(api.IntentionActionDeny)
	denied := time.Now()
	for {
		if _, err := composeGet(front); err != nil {
			break
		}
		if time.Since(denied) > 2*time.Second {
			t.Fatal("the frontend still reaches the backend 2 s after the deny")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("deny took effect after %v", time.Since(denied).Round(time.Millisecond))
	if n := composeSum(composeMetrics(t, composeBackend), "ferry_intentions_denied_total"); n < 1 {
		t.Errorf("backend sidecar counted no denial")
	}
	setIntention(api.IntentionActionAllow)
	composeWait(t, 10*time.Second, func() (string, error) { return composeGet(front) })
	lap("intentions")

	if _, err := c.Run(ctx, "down", "--remove-orphans", "--timeout", "5"); err != nil {
		t.Fatal(err)
	}
	downDone = true
	lap("compose down")
	if out, _ := d.Output(ctx, "ps", "-aq", "--filter", "label=com.docker.compose.project="+composeProject); strings.TrimSpace(out) != "" {
		t.Errorf("containers left after down: %s", out)
	}
	if out, _ := d.Output(ctx, "network", "ls", "-q", "--filter", "label=com.docker.compose.project="+composeProject); strings.TrimSpace(out) != "" {
		t.Errorf("networks left after down: %s", out)
	}
	if after := composeHostState(t, ctx, d); after != before {
		t.Errorf("host state changed by up/down:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func checkSidecarImage(t *testing.T, ctx context.Context, d *dockerenv.Docker) {
	user, err := d.Output(ctx, "image", "inspect", "--format", "{{.Config.User}}", dockerenv.SidecarImage)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(user) != "5995:5995" {
		t.Errorf("sidecar image user = %q, want 5995:5995", user)
	}
	out, err := d.Output(ctx, "run", "--rm", dockerenv.SidecarImage, "version")
	if err != nil || !strings.HasPrefix(out, "ferry ") {
		t.Errorf("ferry version in the sidecar image: %q, %v", out, err)
	}
	if out, err := d.Output(ctx, "run", "--rm", "--entrypoint", "/bin/sh", dockerenv.SidecarImage, "-c", "true"); err == nil {
		t.Errorf("the sidecar image has a shell: %q", out)
	}
	// Its file system is the binary alone (plus what the engine mounts).
	id, err := d.Output(ctx, "create", dockerenv.SidecarImage)
	if err != nil {
		t.Fatal(err)
	}
	id = strings.TrimSpace(id)
	defer d.Output(context.Background(), "rm", id)
	cmd := testbed.MustCommand(t, d.CLI, "export", id)
	cmd.Env = d.Env()
	tarball, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	list := testbed.MustCommand(t, "tar", "-t")
	list.Stdin = strings.NewReader(string(tarball))
	names, err := list.Output()
	if err != nil {
		t.Fatal(err)
	}
	engine := regexp.MustCompile(`^(\.dockerenv|dev/.*|proc/|sys/|etc/|etc/(hostname|hosts|resolv\.conf|mtab))$`)
	var files []string
	for _, n := range strings.Fields(string(names)) {
		if !engine.MatchString(n) {
			files = append(files, n)
		}
	}
	// The binary, and its second name for consul-k8s (a symlink: see the
	// Dockerfile).
	want := []string{"ferry", "usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/consul-dataplane"}
	if !slices.Equal(files, want) {
		t.Errorf("sidecar image files = %v, want %v", files, want)
	}
	verbose := testbed.MustCommand(t, "tar", "-tv")
	verbose.Stdin = strings.NewReader(string(tarball))
	long, err := verbose.Output()
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`usr/local/bin/consul-dataplane -> /ferry\n`).Match(long) {
		t.Errorf("usr/local/bin/consul-dataplane is not a link to /ferry:\n%s", long)
	}
}

func composeWait(t *testing.T, limit time.Duration, f func() (string, error)) string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		out, err := f()
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %v", limit, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

var composeHTTP = &http.Client{Timeout: 3 * time.Second}

func composeGet(url string) (string, error) {
	resp, err := composeHTTP.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s: %s", url, resp.Status, b)
	}
	return string(b), nil
}

func composeMetrics(t *testing.T, ip string) string {
	t.Helper()
	out, err := composeGet("http://" + ip + ":19000/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", ip, err)
	}
	return out
}

// sumMetric adds up the samples whose line starts with prefix.
func composeSum(text, prefix string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func composeGrep(text, substr string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, substr) && !strings.HasPrefix(line, "#") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

func composePID(t *testing.T, ctx context.Context, d *dockerenv.Docker, service string) int {
	t.Helper()
	out, err := d.Output(ctx, "inspect", "--format", "{{.State.Pid}}", composeProject+"-"+service+"-1")
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid == 0 {
		t.Fatalf("%s: pid %q", service, out)
	}
	return pid
}

func composeUID(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Uid:" {
			return f[1]
		}
	}
	return "?"
}

func composeNetworks(t *testing.T, ctx context.Context, d *dockerenv.Docker, subnet string) []string {
	t.Helper()
	ids, err := d.Output(ctx, "network", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	var hits []string
	for _, id := range strings.Fields(ids) {
		out, _ := d.Output(ctx, "network", "inspect", "--format", "{{.Name}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", id)
		if strings.Contains(out, subnet) {
			hits = append(hits, strings.Fields(out)[0])
		}
	}
	return hits
}

// hostState is what the example could leave on the host: the engine's
// networks and containers, interfaces holding an address of the example's
// network, and iptables rules naming Docker or the example's ranges.
func composeHostState(t *testing.T, ctx context.Context, d *dockerenv.Docker) string {
	t.Helper()
	var b strings.Builder
	nets, _ := d.Output(ctx, "network", "ls", "--format", "{{.Name}}")
	ctrs, _ := d.Output(ctx, "ps", "-a", "--format", "{{.Names}}")
	fmt.Fprintf(&b, "networks: %s\ncontainers: %s\n", strings.Fields(nets), strings.Fields(ctrs))
	addrs, _ := testbed.MustCommand(t, "ip", "-4", "-o", "addr").Output()
	for _, line := range strings.Split(string(addrs), "\n") {
		if strings.Contains(line, "198.19.42.") {
			fmt.Fprintf(&b, "addr: %s\n", line)
		}
	}
	rules, _ := testbed.MustCommand(t, "iptables-save").Output()
	var kept []string
	for _, line := range strings.Split(string(rules), "\n") {
		if strings.Contains(line, "DOCKER") || strings.Contains(line, "198.19.") || strings.Contains(line, "198.18.") {
			kept = append(kept, line)
		}
	}
	sort.Strings(kept)
	fmt.Fprintf(&b, "rules:\n%s\n", strings.Join(kept, "\n"))
	return b.String()
}
