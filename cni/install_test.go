package cni

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// snapshot maps each file of dir to its mode and bytes.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := e.Info()
		out[e.Name()] = fi.Mode().String() + "\n" + string(b)
	}
	return out
}

func sameSnapshot(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: files %v, want %v", what, keys(got), keys(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: %s is\n%s\nwant\n%s", what, k, got[k], v)
		}
	}
}

func keys(m map[string]string) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// Deliberately odd formatting: a re-marshalled file would not match.
const (
	bridgeConf = `{ "cniVersion": "0.4.0", "name": "podnet",
  "type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "198.18.7.0/24"} }
`
	ptpConflist = `{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"198.18.8.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}`
)

type installDirs struct {
	bin, net, bin0 string
	cfg            InstallConfig
}

func newInstallDirs(t *testing.T, files map[string]string) *installDirs {
	t.Helper()
	d := &installDirs{bin: t.TempDir(), net: t.TempDir(), bin0: t.TempDir()}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(d.net, name), []byte(body), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	// Something else's plugin in the bin dir must survive.
	if err := os.WriteFile(filepath.Join(d.bin, "bridge"), []byte("ELF"), 0o755); err != nil {
		t.Fatal(err)
	}
	self := filepath.Join(d.bin0, "ferry")
	if err := os.WriteFile(self, []byte("ferry binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(d.bin0, "ca.crt")
	tok := filepath.Join(d.bin0, "token")
	_, caPEM := testServer(t, nil)
	os.WriteFile(ca, caPEM, 0o644)
	os.WriteFile(tok, []byte("tok-1\n"), 0o600)
	d.cfg = InstallConfig{BinDir: d.bin, NetDir: d.net, Binary: self, Server: "https://198.18.0.1:6443", CAFile: ca, TokenFile: tok}
	return d
}

func readPlugins(t *testing.T, path string) (string, []map[string]any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		CNIVersion string           `json:"cniVersion"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatalf("%s: %v\n%s", path, err, b)
	}
	return l.CNIVersion, l.Plugins
}

// Install then uninstall leaves both directories byte for byte (and mode
// for mode) as they were, whether the first config is a .conf or a
// .conflist; a second Install changes nothing.
func TestInstallUninstallRoundTrip(t *testing.T) {
	cases := []struct {
		name   string
		files  map[string]string
		target string // the config Install writes
		types  []string
	}{
		{"conf becomes conflist", map[string]string{"10-podnet.conf": bridgeConf, "20-other.conflist": ptpConflist, "README": "not a config"},
			"10-podnet.conflist", []string{"bridge", "ferry-cni"}},
		{"first conflist", map[string]string{"05-other.conflist": ptpConflist, "10-podnet.conf": bridgeConf},
			"05-other.conflist", []string{"ptp", "portmap", "ferry-cni"}},
		{"invalid files are skipped", map[string]string{"00-broken.conf": "{", "01-notype.conf": `{"name":"x"}`, "02-noname.conf": `{"type":"bridge"}`, "10-podnet.json": bridgeConf},
			"10-podnet.conflist", []string{"bridge", "ferry-cni"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newInstallDirs(t, c.files)
			net0, bin0 := snapshot(t, d.net), snapshot(t, d.bin)

			res, err := Install(d.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Changed || filepath.Base(res.ConfFile) != c.target {
				t.Fatalf("Install: %+v", res)
			}
			_, plugins := readPlugins(t, res.ConfFile)
			var types []string
			for _, p := range plugins {
				types = append(types, p["type"].(string))
			}
			if strings.Join(types, ",") != strings.Join(c.types, ",") {
				t.Fatalf("plugins %v, want %v", types, c.types)
			}
			last := plugins[len(plugins)-1]
			if last["kubeconfig"] != KubeconfigName || last["cni_net_dir"] != d.net {
				t.Fatalf("entry %v", last)
			}
			if b, err := os.ReadFile(filepath.Join(d.bin, PluginType)); err != nil || string(b) != "ferry binary" {
				t.Fatalf("binary: %v %q", err, b)
			}
			// The kubeconfig it wrote is one the plugin can load.
			if _, err := LoadKubeconfig(filepath.Join(d.net, KubeconfigName)); err != nil {
				t.Fatalf("kubeconfig: %v", err)
			}

			after := snapshot(t, d.net)
			res, err = Install(d.cfg)
			if err != nil || res.Changed {
				t.Fatalf("second Install: %+v %v", res, err)
			}
			sameSnapshot(t, "second install", snapshot(t, d.net), after)

			if err := Uninstall(d.bin, d.net); err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, "net dir after uninstall", snapshot(t, d.net), net0)
			sameSnapshot(t, "bin dir after uninstall", snapshot(t, d.bin), bin0)
			if err := Uninstall(d.bin, d.net); err != nil {
				t.Fatalf("second uninstall: %v", err)
			}
		})
	}
}

// Drift: the network plugin rewrites its config without ferry-cni, the
// token rotates, the binary is updated. Install repairs each; Uninstall
// then removes only ferry-cni's entry from the rewritten file.
func TestInstallRepairs(t *testing.T) {
	d := newInstallDirs(t, map[string]string{"10-podnet.conflist": ptpConflist})
	res, err := Install(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	rewritten := strings.Replace(ptpConflist, `"portmap"`, `"tuning"`, 1)
	os.WriteFile(res.ConfFile, []byte(rewritten), 0o640)
	os.WriteFile(d.cfg.TokenFile, []byte("tok-2\n"), 0o600)
	os.WriteFile(d.cfg.Binary, []byte("ferry binary v2"), 0o755)
	res, err = Install(d.cfg)
	if err != nil || !res.Changed {
		t.Fatalf("repair: %+v %v", res, err)
	}
	if _, plugins := readPlugins(t, res.ConfFile); len(plugins) != 3 || plugins[1]["type"] != "tuning" || plugins[2]["type"] != PluginType {
		t.Fatalf("after repair: %v", plugins)
	}
	if b, _ := os.ReadFile(filepath.Join(d.net, TokenName)); string(b) != "tok-2\n" {
		t.Fatalf("token not re-copied: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(d.bin, PluginType)); string(b) != "ferry binary v2" {
		t.Fatalf("binary not updated: %q", b)
	}
	// A stale entry (install state lost) is replaced, not duplicated.
	os.Remove(filepath.Join(d.net, stateName))
	if _, err := Install(d.cfg); err != nil {
		t.Fatal(err)
	}
	if _, plugins := readPlugins(t, res.ConfFile); len(plugins) != 3 {
		t.Fatalf("duplicate entry: %v", plugins)
	}
	if err := Uninstall(d.bin, d.net); err != nil {
		t.Fatal(err)
	}
	_, plugins := readPlugins(t, res.ConfFile)
	if len(plugins) != 2 || plugins[1]["type"] != "tuning" {
		t.Fatalf("after uninstall: %v", plugins)
	}
	for _, f := range []string{KubeconfigName, TokenName, stateName} {
		if _, err := os.Stat(filepath.Join(d.net, f)); err == nil {
			t.Errorf("%s left behind", f)
		}
	}
}

func TestInstallRefuses(t *testing.T) {
	d := newInstallDirs(t, nil)
	if _, err := Install(d.cfg); err == nil || !strings.Contains(err.Error(), "no network config") {
		t.Fatalf("empty dir: %v", err)
	}
	old := strings.Replace(bridgeConf, "0.4.0", "0.2.0", 1)
	d = newInstallDirs(t, map[string]string{"10-old.conf": old})
	if _, err := Install(d.cfg); err == nil || !strings.Contains(err.Error(), "0.2.0") {
		t.Fatalf("cniVersion 0.2.0: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(d.net, "10-old.conf")); string(b) != old {
		t.Fatal("refused install changed the config")
	}
}

// Without an API server (Nomad), no kubeconfig is written or named.
func TestInstallWithoutKubernetes(t *testing.T) {
	d := newInstallDirs(t, map[string]string{"10-podnet.conf": bridgeConf})
	d.cfg.Server = ""
	res, err := Install(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	_, plugins := readPlugins(t, res.ConfFile)
	if _, ok := plugins[1]["kubeconfig"]; ok {
		t.Fatalf("kubeconfig named: %v", plugins[1])
	}
	if _, err := os.Stat(filepath.Join(d.net, KubeconfigName)); err == nil {
		t.Fatal("kubeconfig written")
	}
}

// A .conf without cniVersion (0.1.0 by the spec's old default; runtimes
// accept it) becomes a 0.3.1 list, as consul-k8s writes, never "null".
func TestInstallConfWithoutVersion(t *testing.T) {
	d := newInstallDirs(t, map[string]string{"10-podnet.conf": `{"name":"podnet","type":"bridge"}`})
	res, err := Install(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if v, plugins := readPlugins(t, res.ConfFile); v != "0.3.1" || len(plugins) != 2 {
		t.Fatalf("cniVersion %q, plugins %v", v, plugins)
	}
}
