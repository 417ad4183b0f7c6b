package testbed

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// The Kubernetes control plane and the CNI tool come from the nested module
// test/k8stools (never ferry's own dependency graph), built once into
// .cache/bin and rebuilt when that module's go.mod or go.sum changes. See
// shared/reference/kube-apiserver.md for the flags and pitfalls.

const kubeVersion = "v1.37.2"

// k8sToolsStamp keys the cached binaries: the module's requirements and the
// Go toolchain that built them.
func k8sToolsStamp(root string) (string, error) {
	h := sha256.New()
	for _, f := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(root, "test", "k8stools", f))
		if err != nil {
			return "", fmt.Errorf("testbed: k8stools %s: %w", f, err)
		}
		h.Write(b)
	}
	cmd, err := Command("go", "env", "GOVERSION")
	if err != nil {
		return "", err
	}
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("testbed: go env GOVERSION: %w", err)
	}
	h.Write(out)
	return hex.EncodeToString(h.Sum(nil)[:8]), nil
}

func buildK8sTool(name, pkg, ldflags string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	stamp, err := k8sToolsStamp(root)
	if err != nil {
		return "", err
	}
	return built.get(name, func() (string, error) {
		out := filepath.Join(root, ".cache", "bin", name)
		return out, buildLocked(root, out, stamp, []string{"go", "build", "-C", filepath.Join(root, "test", "k8stools"),
			"-trimpath", "-ldflags", ldflags, "-o", out, pkg})
	})
}

// kubeLDFlags stamps the version kube-apiserver reports (unstamped, it
// says v0.0.0-master and clients refuse to parse it).
func kubeLDFlags() string {
	f := "-s -w"
	for _, kv := range []string{"gitVersion=" + kubeVersion, "gitMajor=1", "gitMinor=37", "gitTreeState=clean", "buildDate=2026-01-01T00:00:00Z"} {
		f += " -X k8s.io/component-base/version." + kv + " -X k8s.io/client-go/pkg/version." + kv
	}
	return f
}

// CNITool returns the CNI project's cnitool, built from the module proxy.
func CNITool() (string, error) {
	return buildK8sTool("cnitool", "github.com/containernetworking/cni/cnitool", "-s -w")
}

// CNIToolBinary is CNITool for tests.
func CNIToolBinary(t testing.TB) string {
	t.Helper()
	p, err := CNITool()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// KubeBinaries returns kube-apiserver and etcd. The first build takes about
// ten minutes on two cores; `make k8stools` runs it as its own step.
func KubeBinaries() (apiserver, etcd string, err error) {
	if etcd, err = buildK8sTool("etcd", "go.etcd.io/etcd/server/v3", "-s -w"); err != nil {
		return "", "", err
	}
	if apiserver, err = buildK8sTool("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", kubeLDFlags()); err != nil {
		return "", "", err
	}
	return apiserver, etcd, nil
}

// Kube is a running etcd and kube-apiserver on loopback: no kubelet, no
// controllers, so pods stay Pending, which is all an API client needs.
type Kube struct {
	// Server is the API server's URL; CAFile verifies its certificate.
	Server, CAFile string
	// Token is a static bearer token in system:masters.
	Token string
	// Kubeconfig is a kubeconfig file for Server, CAFile and Token.
	Kubeconfig string

	client *http.Client
}

// StartKube starts etcd and kube-apiserver for t and stops them at
// cleanup, the API server first (cleanups run last-in first-out): stopped
// after etcd, its shutdown stalls for ~10 s.
func StartKube(t testing.TB) *Kube {
	t.Helper()
	apiserver, etcd, err := KubeBinaries()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ports, err := freePorts(3)
	if err != nil {
		t.Fatal(err)
	}
	ec, ep, kp := ports[0], ports[1], ports[2]
	ecURL, epURL := "http://127.0.0.1:"+strconv.Itoa(ec), "http://127.0.0.1:"+strconv.Itoa(ep)

	etcdProc := startHostProcess(t, "etcd", etcd,
		"--name", "e2e", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", ecURL, "--advertise-client-urls", ecURL,
		"--listen-peer-urls", epURL, "--initial-advertise-peer-urls", epURL,
		"--initial-cluster", "e2e="+epURL, "--unsafe-no-fsync", "--log-level", "warn")
	plain := &http.Client{Timeout: 2 * time.Second}
	waitHTTP(t, "etcd", etcdProc, 60*time.Second, func() bool {
		resp, err := plain.Get(ecURL + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})

	saKey := filepath.Join(dir, "sa.key")
	saPub := filepath.Join(dir, "sa.pub")
	if err := writeSAKeys(saKey, saPub); err != nil {
		t.Fatal(err)
	}
	tokBytes := make([]byte, 16)
	rand.Read(tokBytes)
	k := &Kube{Token: hex.EncodeToString(tokBytes)}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(k.Token+",admin,admin-uid,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(dir, "kas-certs")
	kas := startHostProcess(t, "kube-apiserver", apiserver,
		"--etcd-servers="+ecURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(kp),
		"--endpoint-reconciler-type=none",
		"--cert-dir="+certDir,
		"--service-cluster-ip-range=198.19.0.0/24",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub, "--service-account-signing-key-file="+saKey,
		"--token-auth-file="+tokens, "--authorization-mode=RBAC",
		// No controller-manager creates the default ServiceAccount.
		"--disable-admission-plugins=ServiceAccount")

	k.Server = "https://127.0.0.1:" + strconv.Itoa(kp)
	k.CAFile = filepath.Join(certDir, "apiserver.crt")
	waitHTTP(t, "kube-apiserver", kas, 90*time.Second, func() bool {
		if k.client == nil {
			ca, err := os.ReadFile(k.CAFile)
			if err != nil {
				return false
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(ca) {
				return false
			}
			k.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: pool}, Proxy: nil}}
		}
		code, _, err := k.Do(context.Background(), "GET", "/readyz", nil)
		return err == nil && code == 200
	})
	k.Kubeconfig = filepath.Join(dir, "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
current-context: e2e
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: e2e
  context:
    cluster: e2e
    user: admin
`, k.Server, k.CAFile, k.Token)
	if err := os.WriteFile(k.Kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return k
}

// Do sends one API request with the admin token; body, if not nil, is
// JSON-encoded. It returns the status code and the response body.
func (k *Kube) Do(ctx context.Context, method, path string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, k.Server+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+k.Token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// MustDo is Do that fails t unless the status is want.
func (k *Kube) MustDo(t testing.TB, method, path string, body any, want int) []byte {
	t.Helper()
	code, b, err := k.Do(context.Background(), method, path, body)
	if err != nil || code != want {
		t.Fatalf("kube %s %s: %d %v\n%s", method, path, code, err, b)
	}
	return b
}

// CreatePod creates namespace ns (if needed) and a pod in it with the
// given annotations; it stays Pending (there is no node).
func (k *Kube) CreatePod(t testing.TB, ns, name string, annotations map[string]string) {
	t.Helper()
	code, b, err := k.Do(context.Background(), "POST", "/api/v1/namespaces", map[string]any{
		"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": ns}})
	if err != nil || (code != 201 && code != 409) {
		t.Fatalf("create namespace %s: %d %v\n%s", ns, code, err, b)
	}
	k.MustDo(t, "POST", "/api/v1/namespaces/"+ns+"/pods", map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": name, "annotations": annotations},
		"spec":     map[string]any{"containers": []any{map[string]any{"name": "app", "image": "app"}}},
	}, 201)
}

// hostProcess is a test helper process on the host (not in a pod).
type hostProcess struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

func startHostProcess(t testing.TB, name, path string, args ...string) *hostProcess {
	t.Helper()
	cmd, err := Command(path, args...)
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &hostProcess{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(10 * time.Second)
		if t.Failed() {
			t.Logf("%s (output tail):\n%s", name, tail(out.String(), 30))
		}
	})
	return p
}

// stop sends SIGTERM, waits up to d, then SIGKILLs. Idempotent.
func (p *hostProcess) stop(d time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(d):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func waitHTTP(t testing.TB, name string, p *hostProcess, limit time.Duration, ready func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !ready() {
		select {
		case <-p.done:
			t.Fatalf("%s exited before it was ready:\n%s", name, tail(p.out.String(), 30))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after %v:\n%s", name, limit, tail(p.out.String(), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func writeSAKeys(keyPath, pubPath string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	return os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644)
}

// DryRunManifest creates every object of the multi-document YAML manifest
// file with dryRun=All and strict field validation, so that the API
// server's own validation checks the manifest users apply. paths maps each
// object's "apiVersion/kind" to its collection's path; objects whose key
// starts with one of skip (kinds a bare API server does not serve) are
// passed over. An object of another kind, or one missing, fails t.
func (k *Kube) DryRunManifest(t testing.TB, file string, paths map[string]string, skip ...string) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
next:
	for _, doc := range strings.Split(string(data), "\n---\n") {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			t.Fatalf("%s: %v\n%s", file, err, doc)
		}
		key := fmt.Sprint(obj["apiVersion"], "/", obj["kind"])
		for _, s := range skip {
			if strings.HasPrefix(key, s) {
				continue next
			}
		}
		path, ok := paths[key]
		if !ok {
			t.Fatalf("%s: unexpected object %s", file, key)
		}
		k.MustDo(t, "POST", path+"?dryRun=All&fieldValidation=Strict", obj, 201)
		seen[key] = true
	}
	for key := range paths {
		if !seen[key] {
			t.Errorf("%s: no %s object", file, key)
		}
	}
}
