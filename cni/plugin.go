package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/hashicorp/go-hclog"
	corev1 "k8s.io/api/core/v1"

	"github.com/ferrymesh/ferry/redirect"
)

// Pod annotations consul-k8s's webhook writes in CNI mode (reference
// consul-k8s.md §1, redirect.md §2.1).
const (
	AnnotationRedirectConfig = "consul.hashicorp.com/redirect-traffic-config"
)

// ArgIptablesConfig is the CNI_ARGS key Nomad passes the redirect config in.
const ArgIptablesConfig = "CONSUL_IPTABLES_CONFIG"

// PodGetter reads one pod from the Kubernetes API.
type PodGetter interface {
	Pod(ctx context.Context, namespace, name string) (*corev1.Pod, error)
}

// Plugin is ferry-cni's ADD, CHECK and DEL. Its fields are its
// dependencies; the zero value is not usable, see New.
type Plugin struct {
	Stdout io.Writer
	Stderr io.Writer
	Rules  Rules
	// Pods returns the client for the config's kubeconfig.
	Pods func(conf *PluginConf) (PodGetter, error)
	// Timeout bounds one command (the API lookup and iptables).
	Timeout time.Duration
	// CheckNetNS vets CNI_NETNS; nil means the real check (a network
	// namespace that is not the node's). Tests without root replace it.
	CheckNetNS func(path string) error
}

func (p *Plugin) checkNetNS(path string) error {
	if p.CheckNetNS != nil {
		return p.CheckNetNS(path)
	}
	return checkNetNS(path)
}

// New returns the plugin wired to the real namespace rules and the
// kubeconfig named in the network config.
func New(stdout, stderr io.Writer) *Plugin {
	return &Plugin{
		Stdout: stdout,
		Stderr: stderr,
		Rules:  NetNSRules{},
		Pods: func(conf *PluginConf) (PodGetter, error) {
			return LoadKubeconfig(conf.KubeconfigPath())
		},
		Timeout: time.Minute,
	}
}

// About is printed by the CNI library when the binary runs without
// CNI_COMMAND.
const About = "ferry-cni: Consul transparent-proxy redirection as a chained CNI plugin (see ferry cni -h)"

// Main runs the plugin under the CNI library's dispatcher (environment,
// stdin, version negotiation, VERSION). The caller prints a returned error
// (err.Print writes the CNI error result to stdout) and exits 1.
func (p *Plugin) Main() *types.Error {
	return skel.PluginMainFuncsWithError(skel.CNIFuncs{
		Add:   p.Add,
		Check: p.Check,
		Del:   p.Del,
	}, SupportedVersions, About)
}

func (p *Plugin) logger(conf *PluginConf, args *skel.CmdArgs) hclog.Logger {
	level := hclog.Info
	if conf != nil && conf.LogLevel != "" {
		if l := hclog.LevelFromString(conf.LogLevel); l != hclog.NoLevel {
			level = l
		}
	}
	return hclog.New(&hclog.LoggerOptions{Name: "ferry-cni", Output: p.Stderr, Level: level}).
		With("container", args.ContainerID, "netns", args.Netns)
}

// Add installs the rules in CNI_NETNS and passes prevResult through. A pod
// with no redirect config is passed through untouched.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	log := p.logger(conf, args)
	ctx, cancel := context.WithTimeout(context.Background(), p.Timeout)
	defer cancel()

	if err := p.checkNetNS(args.Netns); err != nil {
		return cniError(types.ErrInvalidNetNS, "ferry-cni: invalid CNI_NETNS", err)
	}
	spec, ok, err := p.spec(ctx, conf, args)
	if err != nil {
		return err
	}
	if ok {
		res, err := p.Rules.Apply(ctx, args.Netns, spec)
		if err != nil {
			return cniError(types.ErrInternal, "ferry-cni: install redirection rules", err)
		}
		for _, r := range res {
			log.Info("redirection rules", "family", r.Family.String(), "changed", r.Changed)
		}
	} else {
		log.Debug("no redirect config for this pod; passing through")
	}
	return p.printResult(conf)
}

// printResult writes prevResult in the config's version, or an empty
// result when the plugin runs first (not chained).
func (p *Plugin) printResult(conf *PluginConf) error {
	res := conf.PrevResult
	if res == nil {
		empty, err := version.NewResult(conf.CNIVersion, []byte(fmt.Sprintf(`{"cniVersion":%q}`, conf.CNIVersion)))
		if err != nil {
			return types.NewError(types.ErrInternal, "ferry-cni: empty result", err.Error())
		}
		res = empty
	}
	out, err := res.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, "ferry-cni: convert prevResult", err.Error())
	}
	if err := out.PrintTo(p.Stdout); err != nil {
		return types.NewError(types.ErrIOFailure, "ferry-cni: write result", err.Error())
	}
	return nil
}

// Check verifies the rules ADD installs are in place.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.Timeout)
	defer cancel()
	if err := p.checkNetNS(args.Netns); err != nil {
		return cniError(types.ErrInvalidNetNS, "ferry-cni: invalid CNI_NETNS", err)
	}
	spec, ok, err := p.spec(ctx, conf, args)
	if err != nil || !ok {
		return err
	}
	if err := p.Rules.Check(ctx, args.Netns, spec); err != nil {
		return cniError(types.ErrInternal, "ferry-cni: redirection rules are not in place", err)
	}
	return nil
}

// Del removes ferry's rules (the five chains and the jumps into them) if
// the namespace still exists. A namespace that is gone holds no rules, so
// that is success. DEL needs no redirect config: the pod may already be
// gone from the API server.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	log := p.logger(conf, args)
	if err := p.checkNetNS(args.Netns); err != nil {
		if errors.Is(err, errNoNetNS) {
			log.Debug("network namespace is gone; nothing to remove")
			return nil
		}
		return cniError(types.ErrInvalidNetNS, "ferry-cni: invalid CNI_NETNS", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.Timeout)
	defer cancel()
	res, err := p.Rules.Cleanup(ctx, args.Netns)
	if err != nil {
		return cniError(types.ErrInternal, "ferry-cni: remove redirection rules", err)
	}
	for _, r := range res {
		log.Debug("redirection rules removed", "family", r.Family.String(), "changed", r.Changed)
	}
	return nil
}

// spec finds and validates the pod's redirect config. ok is false when
// the pod has none (not meshed, or not in transparent-proxy mode).
//
//   - CNI_ARGS CONSUL_IPTABLES_CONFIG (Nomad) wins; no API call is made.
//   - Otherwise, with K8S_POD_NAME and K8S_POD_NAMESPACE, the pod's
//     redirect-traffic-config annotation, read through the kubeconfig.
//   - Neither: the sandbox is not a pod ferry-cni knows how to ask about.
func (p *Plugin) spec(ctx context.Context, conf *PluginConf, args *skel.CmdArgs) (redirect.Spec, bool, error) {
	pa, err := ParseArgs(args.Args)
	if err != nil {
		return redirect.Spec{}, false, err
	}
	var raw, source string
	switch {
	case string(pa.CONSUL_IPTABLES_CONFIG) != "":
		raw, source = string(pa.CONSUL_IPTABLES_CONFIG), "CNI_ARGS "+ArgIptablesConfig
	case pa.K8S_POD_NAME != "" || pa.K8S_POD_NAMESPACE != "":
		if pa.K8S_POD_NAME == "" || pa.K8S_POD_NAMESPACE == "" {
			return redirect.Spec{}, false, types.NewError(types.ErrInvalidEnvironmentVariables,
				"ferry-cni: CNI_ARGS names only one of K8S_POD_NAMESPACE and K8S_POD_NAME", "")
		}
		if conf.Kubeconfig == "" {
			// Failing closed: without the lookup, a pod that wants its
			// traffic redirected would start with none.
			return redirect.Spec{}, false, types.NewError(types.ErrInvalidNetworkConfig,
				"ferry-cni: a Kubernetes pod, but the network config names no kubeconfig to read its annotations with", "")
		}
		pods, err := p.Pods(conf)
		if err != nil {
			return redirect.Spec{}, false, cniError(types.ErrInvalidNetworkConfig, "ferry-cni: kubeconfig "+conf.KubeconfigPath(), err)
		}
		pod, err := pods.Pod(ctx, string(pa.K8S_POD_NAMESPACE), string(pa.K8S_POD_NAME))
		if err != nil {
			return redirect.Spec{}, false, cniError(types.ErrTryAgainLater, "ferry-cni: read the pod from the Kubernetes API", err)
		}
		v, ok := pod.Annotations[AnnotationRedirectConfig]
		if !ok {
			return redirect.Spec{}, false, nil
		}
		raw, source = v, "annotation "+AnnotationRedirectConfig
	default:
		return redirect.Spec{}, false, nil
	}
	return parseRedirectConfig(raw, source)
}

// parseRedirectConfig reads Consul's iptables.Config JSON (the same JSON
// `ferry redirect` takes from CONSUL_REDIRECT_TRAFFIC_CONFIG) and validates
// it; errors name source. Its NetNS field is ignored: CNI_NETNS decides.
func parseRedirectConfig(raw, source string) (redirect.Spec, bool, error) {
	cfg, _, err := redirect.ParseConsulJSON([]byte(raw))
	if err != nil {
		code := uint(types.ErrInvalidNetworkConfig)
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		if errors.As(err, &syn) || errors.As(err, &typ) || errors.Is(err, io.ErrUnexpectedEOF) {
			code = types.ErrDecodingFailure
		}
		return redirect.Spec{}, false, types.NewError(code, "ferry-cni: invalid redirect config",
			strings.ReplaceAll(err.Error(), redirect.EnvRedirectConfig, source))
	}
	relabel(&cfg, redirect.EnvRedirectConfig, source)
	spec, err := cfg.Validate()
	if err != nil {
		return redirect.Spec{}, false, types.NewError(types.ErrInvalidNetworkConfig, "ferry-cni: invalid redirect config", err.Error())
	}
	return spec, true, nil
}

// relabel makes every item's source name where ferry-cni read it.
func relabel(c *redirect.Config, from, to string) {
	fix := func(it *redirect.Item) { it.Source = strings.Replace(it.Source, from, to, 1) }
	for _, it := range []*redirect.Item{&c.ProxyUserID, &c.ProxyInboundPort, &c.ProxyOutboundPort, &c.ConsulDNSIP, &c.ConsulDNSPort} {
		fix(it)
	}
	for _, l := range [][]redirect.Item{c.ExcludeInboundPorts, c.ExcludeOutboundPorts, c.ExcludeOutboundCIDRs, c.ExcludeUIDs} {
		for i := range l {
			fix(&l[i])
		}
	}
}
