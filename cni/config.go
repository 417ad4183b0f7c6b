package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// PluginType is the plugin's "type" in a network config, and so the name of
// its binary in the CNI bin dir.
const PluginType = "ferry-cni"

// ConsulPluginType is consul-cni's type. Nomad writes it into its own bridge
// network config, so to replace consul-cni there the binary is installed
// under that name and answers to that type too.
const ConsulPluginType = "consul-cni"

// SupportedVersions are the CNI spec versions ferry-cni speaks. Chaining
// (prevResult) exists from 0.3.0 on; CHECK from 0.4.0 on (skel enforces
// that).
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Default directories, as the kubelet and consul-k8s use them.
const (
	DefaultBinDir = "/opt/cni/bin"
	DefaultNetDir = "/etc/cni/net.d"
)

// PluginConf is ferry-cni's entry in a network config list. The field
// names are consul-cni's (reference redirect.md §4.1), so an existing
// consul-cni entry works by changing only its type.
type PluginConf struct {
	types.PluginConf

	// Kubeconfig is the kubeconfig the plugin reads pods through: an
	// absolute path, or a file name in CNINetDir. Empty: the pod lookup is
	// unavailable and only CONSUL_IPTABLES_CONFIG (Nomad) configures pods.
	Kubeconfig string `json:"kubeconfig,omitempty"`
	CNIBinDir  string `json:"cni_bin_dir,omitempty"`
	CNINetDir  string `json:"cni_net_dir,omitempty"`
	LogLevel   string `json:"log_level,omitempty"`
	// Multus is consul-cni's Multus mode; ferry-cni does not implement it.
	Multus bool `json:"multus,omitempty"`

	// consul-cni fields ferry-cni reads nowhere but accepts, so a consul-cni
	// entry is a valid ferry-cni entry.
	AutorotateToken  bool            `json:"autorotate_token,omitempty"`
	CNITokenPath     string          `json:"cni_token_path,omitempty"`
	CNIHostTokenPath string          `json:"cni_host_token_path,omitempty"`
	RuntimeConfig    json.RawMessage `json:"runtimeConfig,omitempty"`
}

// KubeconfigPath returns the absolute kubeconfig path, or "" when none is
// configured.
func (c *PluginConf) KubeconfigPath() string {
	if c.Kubeconfig == "" || filepath.IsAbs(c.Kubeconfig) {
		return c.Kubeconfig
	}
	dir := c.CNINetDir
	if dir == "" {
		dir = DefaultNetDir
	}
	return filepath.Join(dir, c.Kubeconfig)
}

// ParseConf decodes the network config from stdin and its prevResult. The
// CNI library has already checked cniVersion against SupportedVersions
// (skel does that before calling ADD, CHECK or DEL). Every problem is a
// *types.Error with the spec's code.
func ParseConf(stdin []byte) (*PluginConf, error) {
	var c PluginConf
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(&c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ferry-cni: network config is not valid JSON", err.Error())
	}
	if c.Type != PluginType && c.Type != ConsulPluginType {
		// A config meant for another plugin is a mistake worth refusing.
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("ferry-cni: network config has type %q, want %q (or %q)", c.Type, PluginType, ConsulPluginType), "")
	}
	if c.Multus {
		return nil, types.NewError(types.ErrUnsupportedField, "ferry-cni: multus mode is not supported", "")
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ferry-cni: invalid prevResult", err.Error())
	}
	return &c, nil
}

// PodArgs are the CNI_ARGS ferry-cni reads: the pod's identity (kubelet,
// containerd and CRI-O pass it) and Nomad's redirect config. The field
// names are the keys: the CNI library matches them by reflection.
type PodArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	CONSUL_IPTABLES_CONFIG     types.UnmarshallableString
}

// ParseArgs reads CNI_ARGS with the CNI library's parser ("K=V;K=V",
// unknown keys refused unless IgnoreUnknown=1, as every runtime sets).
func ParseArgs(s string) (PodArgs, error) {
	var a PodArgs
	if err := types.LoadArgs(s, &a); err != nil {
		return PodArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables, "ferry-cni: invalid CNI_ARGS", err.Error())
	}
	return a, nil
}

// cniError converts err to a CNI error result with the given code unless it
// already is one.
func cniError(code uint, msg string, err error) *types.Error {
	var te *types.Error
	if errors.As(err, &te) {
		return te
	}
	return types.NewError(code, msg, err.Error())
}
