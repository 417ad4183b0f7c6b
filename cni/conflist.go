package cni

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// Reading and editing the node's network configs for Install.

// firstConfig returns the lexically first valid network config, as the
// container runtime picks it (libcni's rules: .conf, .conflist and .json
// files; a .conflist needs a name and plugins, a single config a name
// and a type).
// libcni itself is not imported: it drags in the plugin invoker and its
// tracing dependencies for what is a directory listing.
func firstConfig(dir string) (string, error) {
	ents, err := os.ReadDir(dir) // sorted by name
	if err != nil {
		return "", fmt.Errorf("install: list %s: %w", dir, err)
	}
	for _, e := range ents {
		ext := filepath.Ext(e.Name())
		if e.IsDir() || (ext != ".conf" && ext != ".conflist" && ext != ".json") {
			continue
		}
		f := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if ext == ".conflist" {
			var l types.NetConfList
			if json.Unmarshal(b, &l) == nil && l.Name != "" && len(l.Plugins) > 0 {
				return f, nil
			}
		} else {
			var c types.PluginConf
			if json.Unmarshal(b, &c) == nil && c.Type != "" && c.Name != "" {
				return f, nil
			}
		}
	}
	return "", fmt.Errorf("install: no network config in %s (is the pod network plugin installed yet?)", dir)
}

// withEntry returns the config as a conflist whose last plugin is entry
// (any earlier ferry-cni entry is dropped). A single plugin config becomes
// a one-plugin list with the same name and cniVersion.
func withEntry(data []byte, isList bool, entry map[string]any) ([]byte, error) {
	var list map[string]any
	if isList {
		if err := json.Unmarshal(data, &list); err != nil {
			return nil, err
		}
	} else {
		var conf map[string]any
		if err := json.Unmarshal(data, &conf); err != nil {
			return nil, err
		}
		list = map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{conf}}
	}
	v, _ := list["cniVersion"].(string)
	if v == "" {
		v = "0.3.1" // what consul-k8s's installer writes
		list["cniVersion"] = v
	}
	ok := false
	for _, s := range SupportedVersions.SupportedVersions() {
		if s == v {
			ok = true
		}
	}
	if !ok {
		return nil, fmt.Errorf("cniVersion %q: ferry-cni supports %s", v, strings.Join(SupportedVersions.SupportedVersions(), ", "))
	}
	plugins, _ := list["plugins"].([]any)
	var keep []any
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		keep = append(keep, p)
	}
	list["plugins"] = append(keep, entry)
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

func hasEntry(data []byte, isList bool) bool {
	if !isList {
		return false
	}
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if json.Unmarshal(data, &list) != nil {
		return false
	}
	for _, p := range list.Plugins {
		if p.Type == PluginType {
			return true
		}
	}
	return false
}

// withoutEntry drops ferry-cni entries from a conflist; unchanged input
// comes back as is.
func withoutEntry(data []byte) ([]byte, error) {
	if !hasEntry(data, true) {
		return data, nil
	}
	var list map[string]any
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, err
	}
	plugins, _ := list["plugins"].([]any)
	var keep []any
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		keep = append(keep, p)
	}
	list["plugins"] = keep
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}
