package cni

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Files the installer owns in the CNI config dir. None ends in .conf,
// .conflist or .json, so no runtime mistakes one for a network config, and
// the ZZZ prefix keeps the names last in any listing (consul-k8s's choice).
const (
	KubeconfigName = "ZZZ-ferry-cni-kubeconfig"
	TokenName      = "ZZZ-ferry-cni-token"
	stateName      = ".ferry-cni-install.state"
)

// InstallConfig says where the CNI directories are and how the plugin
// reaches the API server.
type InstallConfig struct {
	BinDir, NetDir string
	// Binary is the file to install as BinDir/ferry-cni (normally the
	// running executable).
	Binary string
	// Server is the API server URL; empty writes no kubeconfig (Nomad).
	Server string
	// CAFile is the API server's CA bundle; it is embedded in the kubeconfig.
	CAFile string
	// TokenFile is the service account token. It is copied to
	// NetDir/ZZZ-ferry-cni-token, which the kubeconfig names as its
	// tokenFile; every Install copies it again, so a rotated token reaches
	// the plugin (consul-k8s#4442: an embedded token expires).
	TokenFile string
	LogLevel  string
}

// installState records what Install changed, so Uninstall can put every
// byte back.
type installState struct {
	// ConfFile is the network config Install wrote (a .conflist).
	ConfFile string `json:"conf_file"`
	// WrittenSHA256 is its content hash as written; a file that no longer
	// matches was rewritten by someone else and is only stripped of
	// ferry-cni's entry on uninstall.
	WrittenSHA256 string `json:"written_sha256"`
	// Original is the file that was there before (maybe a .conf under
	// another name); empty when the original already held a ferry-cni
	// entry and so cannot be restored verbatim.
	OriginalFile string      `json:"original_file,omitempty"`
	Original     []byte      `json:"original,omitempty"`
	OriginalMode fs.FileMode `json:"original_mode,omitempty"`
	// Binary is set when Install created BinDir/ferry-cni.
	Binary string `json:"binary,omitempty"`
}

// InstallResult says what Install did.
type InstallResult struct {
	ConfFile string
	Changed  bool
}

// Install copies the binary, writes the kubeconfig and token, and appends
// ferry-cni as the last plugin of the first network config in NetDir
// (turning a .conf into a .conflist). Running it again changes nothing
// unless something drifted (a new binary, a rotated token, a config
// rewritten by the network plugin), which it repairs.
func Install(c InstallConfig) (InstallResult, error) {
	if c.BinDir == "" || c.NetDir == "" || c.Binary == "" {
		return InstallResult{}, errors.New("install: bin dir, net dir and binary are required")
	}
	st, err := readState(c.NetDir)
	if err != nil {
		return InstallResult{}, err
	}
	changed := false

	binPath := filepath.Join(c.BinDir, PluginType)
	_, statErr := os.Stat(binPath)
	ch, err := copyFileIfDifferent(c.Binary, binPath, 0o755)
	if err != nil {
		return InstallResult{}, fmt.Errorf("install: binary: %w", err)
	}
	if ch && errors.Is(statErr, fs.ErrNotExist) {
		st.Binary = binPath
	}
	changed = changed || ch

	kubeconfig := ""
	if c.Server != "" {
		kubeconfig = KubeconfigName
		ch, err := writeKubeconfig(c)
		if err != nil {
			return InstallResult{}, err
		}
		changed = changed || ch
	}

	entry := map[string]any{
		"type":        PluginType,
		"name":        PluginType,
		"cni_bin_dir": c.BinDir,
		"cni_net_dir": c.NetDir,
	}
	if kubeconfig != "" {
		entry["kubeconfig"] = kubeconfig
	}
	if c.LogLevel != "" {
		entry["log_level"] = c.LogLevel
	}

	first, err := firstConfig(c.NetDir)
	if err != nil {
		return InstallResult{}, err
	}
	cur, err := os.ReadFile(first)
	if err != nil {
		return InstallResult{}, fmt.Errorf("install: %w", err)
	}
	if filepath.Base(first) == st.ConfFile && sha(cur) == st.WrittenSHA256 {
		// Our own file, untouched since; rewrite only if the entry changed.
		want, err := withEntry(cur, true, entry)
		if err != nil {
			return InstallResult{}, fmt.Errorf("install: %s: %w", first, err)
		}
		if bytes.Equal(want, cur) {
			return InstallResult{ConfFile: first, Changed: changed}, writeState(c.NetDir, st)
		}
		if err := writeFileAtomic(first, want, modeOf(first)); err != nil {
			return InstallResult{}, err
		}
		st.WrittenSHA256 = sha(want)
		return InstallResult{ConfFile: first, Changed: true}, writeState(c.NetDir, st)
	}

	// A config we have not seen: install into it, remembering it verbatim.
	isList := filepath.Ext(first) == ".conflist"
	out, err := withEntry(cur, isList, entry)
	if err != nil {
		return InstallResult{}, fmt.Errorf("install: %s: %w", first, err)
	}
	target := first
	if !isList {
		target = strings.TrimSuffix(first, filepath.Ext(first)) + ".conflist"
		if _, err := os.Stat(target); err == nil {
			return InstallResult{}, fmt.Errorf("install: %s would become %s, which exists already", first, target)
		}
	}
	if st.ConfFile != "" && st.ConfFile != filepath.Base(first) {
		// Another config became the first one: take the entry out of the
		// one installed into before.
		if err := restoreConf(c.NetDir, st); err != nil {
			return InstallResult{}, err
		}
	}
	mode := modeOf(first)
	if hasEntry(cur, isList) {
		// Left over from an install whose state is gone: not restorable.
		st.OriginalFile, st.Original, st.OriginalMode = "", nil, 0
	} else {
		st.OriginalFile, st.Original, st.OriginalMode = filepath.Base(first), cur, mode
	}
	st.ConfFile, st.WrittenSHA256 = filepath.Base(target), sha(out)
	// The state goes first: if we die between the two writes, uninstall
	// still knows what to restore.
	if err := writeState(c.NetDir, st); err != nil {
		return InstallResult{}, err
	}
	if err := writeFileAtomic(target, out, mode); err != nil {
		return InstallResult{}, err
	}
	if target != first {
		if err := os.Remove(first); err != nil {
			return InstallResult{}, fmt.Errorf("install: remove %s: %w", first, err)
		}
	}
	return InstallResult{ConfFile: target, Changed: true}, nil
}

// Uninstall undoes Install: the network config gets its original bytes
// back (or, if the network plugin rewrote it meanwhile, only loses the
// ferry-cni entry), and the binary, kubeconfig, token and state go.
func Uninstall(binDir, netDir string) error {
	st, err := readState(netDir)
	if err != nil {
		return err
	}
	var errs []error
	errs = append(errs, restoreConf(netDir, st))
	for _, p := range []string{filepath.Join(netDir, KubeconfigName), filepath.Join(netDir, TokenName)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	bin := st.Binary
	if bin == "" {
		bin = filepath.Join(binDir, PluginType)
	}
	if err := os.Remove(bin); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	if err := os.Remove(filepath.Join(netDir, stateName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("uninstall: %w", err)
	}
	return nil
}

// restoreConf puts back the network config Install wrote into: its
// original bytes if nobody changed it since, else the current content
// without the ferry-cni entry.
func restoreConf(netDir string, st installState) error {
	if st.ConfFile == "" {
		return nil
	}
	path := filepath.Join(netDir, st.ConfFile)
	cur, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case sha(cur) == st.WrittenSHA256 && st.OriginalFile != "":
		orig := filepath.Join(netDir, st.OriginalFile)
		if err := writeFileAtomic(orig, st.Original, st.OriginalMode); err != nil {
			return err
		}
		if orig != path {
			return os.Remove(path)
		}
		return nil
	}
	out, err := withoutEntry(cur)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if bytes.Equal(out, cur) {
		return nil
	}
	return writeFileAtomic(path, out, modeOf(path))
}

func writeKubeconfig(c InstallConfig) (bool, error) {
	changed := false
	user := map[string]any{}
	if c.TokenFile != "" {
		tok, err := os.ReadFile(c.TokenFile)
		if err != nil {
			return false, fmt.Errorf("install: token: %w", err)
		}
		ch, err := writeIfDifferent(filepath.Join(c.NetDir, TokenName), tok, 0o600)
		if err != nil {
			return false, err
		}
		changed = ch
		user["tokenFile"] = filepath.Join(c.NetDir, TokenName)
	}
	cluster := map[string]any{"server": c.Server}
	if c.CAFile != "" {
		ca, err := os.ReadFile(c.CAFile)
		if err != nil {
			return false, fmt.Errorf("install: CA: %w", err)
		}
		cluster["certificate-authority-data"] = ca // []byte marshals as base64
	}
	kc := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": PluginType,
		"clusters":        []any{map[string]any{"name": PluginType, "cluster": cluster}},
		"users":           []any{map[string]any{"name": PluginType, "user": user}},
		"contexts":        []any{map[string]any{"name": PluginType, "context": map[string]any{"cluster": PluginType, "user": PluginType}}},
	}
	// JSON is YAML; the plugin reads it with a YAML parser like kubectl.
	data, err := json.MarshalIndent(kc, "", "  ")
	if err != nil {
		return false, err
	}
	ch, err := writeIfDifferent(filepath.Join(c.NetDir, KubeconfigName), append(data, '\n'), 0o600)
	return changed || ch, err
}

func readState(netDir string) (installState, error) {
	var st installState
	b, err := os.ReadFile(filepath.Join(netDir, stateName))
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("install state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("install state %s: %w", filepath.Join(netDir, stateName), err)
	}
	return st, nil
}

func writeState(netDir string, st installState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	_, err = writeIfDifferent(filepath.Join(netDir, stateName), b, 0o600)
	return err
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func modeOf(path string) fs.FileMode {
	if fi, err := os.Stat(path); err == nil {
		return fi.Mode().Perm()
	}
	return 0o644
}

func writeIfDifferent(path string, data []byte, mode fs.FileMode) (bool, error) {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return false, nil
	}
	return true, writeFileAtomic(path, data, mode)
}

func copyFileIfDifferent(src, dst string, mode fs.FileMode) (bool, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return false, err
	}
	return writeIfDifferent(dst, data, mode)
}

// writeFileAtomic writes through a temp file and a rename, so a runtime
// reading the directory never sees a half-written config (or a plugin
// binary being exec'd while it is rewritten: ETXTBSY).
func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".ferry-cni-tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, bytes.NewReader(data)); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
