package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ferrymesh/ferry/redirect"
)

// fakeRules records what the plugin asked of the kernel.
type fakeRules struct {
	applied, checked, cleaned []string
	spec                      redirect.Spec
	checkErr                  error
}

func (f *fakeRules) Apply(_ context.Context, netns string, spec redirect.Spec) ([]redirect.Result, error) {
	f.applied = append(f.applied, netns)
	f.spec = spec
	return []redirect.Result{{Family: redirect.IPv4, Changed: true}}, nil
}

func (f *fakeRules) Check(_ context.Context, netns string, spec redirect.Spec) error {
	f.checked = append(f.checked, netns)
	return f.checkErr
}

func (f *fakeRules) Cleanup(_ context.Context, netns string) ([]redirect.Result, error) {
	f.cleaned = append(f.cleaned, netns)
	return nil, nil
}

type fakePods struct {
	pods map[string]*corev1.Pod
	err  error
}

func (f *fakePods) Pod(_ context.Context, ns, name string) (*corev1.Pod, error) {
	if f.err != nil {
		return nil, f.err
	}
	p, ok := f.pods[ns+"/"+name]
	if !ok {
		return nil, ErrPodNotFound
	}
	return p, nil
}

const testConfigJSON = `{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeUIDs":["5996"]}`

func testPlugin(rules *fakeRules, pods *fakePods) (*Plugin, *bytes.Buffer) {
	var out bytes.Buffer
	return &Plugin{
		Stdout:     &out,
		Stderr:     io.Discard,
		Rules:      rules,
		Pods:       func(*PluginConf) (PodGetter, error) { return pods, nil },
		Timeout:    5 * time.Second,
		CheckNetNS: func(string) error { return nil },
	}, &out
}

const prev100 = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"198.18.0.5/24","interface":0}]}`

func stdin(t *testing.T, version, extra string, prev string) []byte {
	t.Helper()
	s := fmt.Sprintf(`{"cniVersion":%q,"name":"net","type":"ferry-cni"%s`, version, extra)
	if prev != "" {
		s += `,"prevResult":` + prev
	}
	return []byte(s + "}")
}

func codeOf(t *testing.T, err error) uint {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("not a CNI error: %v", err)
	}
	return te.Code
}

// ADD passes prevResult through in every supported version, the result
// converted to the config's version, and installs the rules once.
func TestAddPassesPrevResult(t *testing.T) {
	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			rules := &fakeRules{}
			p, out := testPlugin(rules, nil)
			prev := strings.Replace(prev100, `"1.0.0"`, fmt.Sprintf("%q", v), 1)
			args := &skel.CmdArgs{ContainerID: "c", Netns: "/run/netns/x", IfName: "eth0",
				Args: "IgnoreUnknown=1;CONSUL_IPTABLES_CONFIG=" + testConfigJSON, StdinData: stdin(t, v, "", prev)}
			if err := p.Add(args); err != nil {
				t.Fatal(err)
			}
			var res struct {
				CNIVersion string `json:"cniVersion"`
				IPs        []struct {
					Address string `json:"address"`
				} `json:"ips"`
			}
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if res.CNIVersion != v || len(res.IPs) != 1 || res.IPs[0].Address != "198.18.0.5/24" {
				t.Fatalf("result %s", out)
			}
			if len(rules.applied) != 1 || rules.spec.ProxyUID != "5995" || rules.spec.InboundPort != 20000 ||
				len(rules.spec.ExcludeUIDs) != 1 {
				t.Fatalf("applied %v %+v", rules.applied, rules.spec)
			}
		})
	}
}

// Rules must never land in the node's own namespace; the check runs before
// anything is applied (the CNI library's own check runs after ADD).
func TestAddRefusesNodeNetNS(t *testing.T) {
	rules := &fakeRules{}
	p, out := testPlugin(rules, nil)
	p.CheckNetNS = nil // the real check
	for _, netns := range []string{"/proc/self/ns/net", "/proc/thread-self/ns/net", "", "/nonexistent", "/etc/hostname"} {
		args := &skel.CmdArgs{ContainerID: "c", Netns: netns, IfName: "eth0",
			Args: "CONSUL_IPTABLES_CONFIG=" + testConfigJSON, StdinData: stdin(t, "1.0.0", "", prev100)}
		err := p.Add(args)
		if err == nil || codeOf(t, err) != types.ErrInvalidNetNS {
			t.Fatalf("%q: %v", netns, err)
		}
		if err := p.Check(args); err == nil {
			t.Fatalf("CHECK %q passed", netns)
		}
	}
	if len(rules.applied)+len(rules.checked) != 0 || out.Len() != 0 {
		t.Fatalf("touched: %v %v, printed %q", rules.applied, rules.checked, out)
	}
	// DEL: a gone namespace is success with nothing done; the node's own
	// is refused.
	for _, netns := range []string{"", "/nonexistent"} {
		if err := p.Del(&skel.CmdArgs{ContainerID: "c", Netns: netns, IfName: "eth0", StdinData: stdin(t, "1.0.0", "", "")}); err != nil {
			t.Fatalf("DEL %q: %v", netns, err)
		}
	}
	if err := p.Del(&skel.CmdArgs{ContainerID: "c", Netns: "/proc/self/ns/net", IfName: "eth0", StdinData: stdin(t, "1.0.0", "", "")}); err == nil {
		t.Fatal("DEL in the node's namespace passed")
	}
	if len(rules.cleaned) != 0 {
		t.Fatalf("cleaned %v", rules.cleaned)
	}
}

func pod(ann map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "apps", Annotations: ann}}
}

// Where the redirect config comes from, and what happens without one.
func TestAddConfigSources(t *testing.T) {
	k8s := "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc"
	kc := `,"kubeconfig":"/etc/cni/net.d/kc"`
	cases := []struct {
		name, args, extra string
		pods              *fakePods
		applied           bool
		code              uint // 0: success
		want              string
	}{
		{name: "nomad CNI_ARGS", args: "IgnoreUnknown=true;CONSUL_IPTABLES_CONFIG=" + testConfigJSON, applied: true},
		{name: "nomad CNI_ARGS win over the pod", args: k8s + ";CONSUL_IPTABLES_CONFIG=" + testConfigJSON, extra: kc,
			pods: &fakePods{err: errors.New("must not be called")}, applied: true},
		{name: "annotated pod", args: k8s, extra: kc,
			pods: &fakePods{pods: map[string]*corev1.Pod{"apps/web": pod(map[string]string{AnnotationRedirectConfig: testConfigJSON})}}, applied: true},
		{name: "pod without the annotation is left alone", args: k8s, extra: kc,
			pods: &fakePods{pods: map[string]*corev1.Pod{"apps/web": pod(map[string]string{"consul.hashicorp.com/connect-inject": "false"})}}},
		{name: "no pod identity and no config: left alone", args: ""},
		{name: "malformed annotation", args: k8s, extra: kc,
			pods: &fakePods{pods: map[string]*corev1.Pod{"apps/web": pod(map[string]string{AnnotationRedirectConfig: `{"ProxyUserID":`})}},
			code: types.ErrDecodingFailure, want: "annotation " + AnnotationRedirectConfig},
		{name: "invalid annotation value", args: k8s, extra: kc,
			pods: &fakePods{pods: map[string]*corev1.Pod{"apps/web": pod(map[string]string{AnnotationRedirectConfig: `{"ProxyUserID":"x","ProxyInboundPort":1}`})}},
			code: types.ErrInvalidNetworkConfig, want: "annotation " + AnnotationRedirectConfig + " field ProxyUserID"},
		{name: "pod not found", args: k8s, extra: kc, pods: &fakePods{}, code: types.ErrTryAgainLater, want: "not found"},
		{name: "API unreachable", args: k8s, extra: kc, pods: &fakePods{err: errors.New("connection refused")}, code: types.ErrTryAgainLater, want: "refused"},
		{name: "k8s pod, no kubeconfig", args: k8s, code: types.ErrInvalidNetworkConfig, want: "kubeconfig"},
		{name: "unknown CNI_ARGS key", args: "FOO=bar", code: types.ErrInvalidEnvironmentVariables, want: "FOO"},
		{name: "pod name without namespace", args: "K8S_POD_NAME=web", extra: kc, code: types.ErrInvalidEnvironmentVariables, want: "K8S_POD_NAMESPACE"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rules := &fakeRules{}
			p, out := testPlugin(rules, c.pods)
			args := &skel.CmdArgs{ContainerID: "c", Netns: "/run/netns/x", IfName: "eth0", Args: c.args, StdinData: stdin(t, "1.0.0", c.extra, prev100)}
			err := p.Add(args)
			if c.code != 0 {
				if err == nil || codeOf(t, err) != c.code || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("err %v, want code %d naming %q", err, c.code, c.want)
				}
				if len(rules.applied) != 0 || out.Len() != 0 {
					t.Fatalf("applied %v, printed %s", rules.applied, out)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (len(rules.applied) == 1) != c.applied {
				t.Fatalf("applied %v, want %v", rules.applied, c.applied)
			}
			if !strings.Contains(out.String(), "198.18.0.5/24") {
				t.Fatalf("prevResult not passed through: %s", out)
			}
			// CHECK follows ADD: it checks exactly when ADD applied.
			if err := p.Check(args); err != nil {
				t.Fatal(err)
			}
			if (len(rules.checked) == 1) != c.applied {
				t.Fatalf("checked %v", rules.checked)
			}
		})
	}
}

func TestCheckReportsMissingRules(t *testing.T) {
	rules := &fakeRules{checkErr: errors.New("redirect: IPv4 nat table does not hold the rules: chain CONSUL_PROXY_OUTPUT is missing")}
	p, _ := testPlugin(rules, nil)
	err := p.Check(&skel.CmdArgs{ContainerID: "c", Netns: "/run/netns/x", IfName: "eth0",
		Args: "CONSUL_IPTABLES_CONFIG=" + testConfigJSON, StdinData: stdin(t, "1.0.0", "", prev100)})
	if err == nil || codeOf(t, err) != types.ErrInternal || !strings.Contains(err.Error(), "CONSUL_PROXY_OUTPUT") {
		t.Fatalf("%v", err)
	}
}

func TestParseConf(t *testing.T) {
	for _, c := range []struct {
		in   string
		code uint
	}{
		{`{"cniVersion":"1.0.0","name":"n","type":"ferry-cni"`, types.ErrDecodingFailure},
		{`{"cniVersion":"1.0.0","name":"n","type":"bridge"}`, types.ErrInvalidNetworkConfig},
		{`{"cniVersion":"1.0.0","name":"n","type":"ferry-cni","multus":true}`, types.ErrUnsupportedField},
		{`{"cniVersion":"1.0.0","name":"n","type":"ferry-cni","prevResult":{"ips":[{"address":"nope"}]}}`, types.ErrDecodingFailure},
	} {
		if _, err := ParseConf([]byte(c.in)); err == nil || codeOf(t, err) != c.code {
			t.Errorf("%s: %v, want code %d", c.in, err, c.code)
		}
	}
	// Nomad's entry: consul-cni's type, nothing else.
	if _, err := ParseConf([]byte(`{"cniVersion":"1.0.0","name":"nomad","type":"consul-cni","log_level":"debug"}`)); err != nil {
		t.Fatal(err)
	}
	// consul-k8s's consul-cni entry, type changed, is accepted as is.
	c, err := ParseConf([]byte(`{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"ferry-cni","autorotate_token":false,` +
		`"cni_bin_dir":"/opt/cni/bin","cni_host_token_path":"/etc/cni/net.d/cni-host-token","cni_net_dir":"/etc/cni/net.d",` +
		`"cni_token_path":"/var/run/secrets/kubernetes.io/serviceaccount/token","kubeconfig":"ZZZ-consul-cni-kubeconfig",` +
		`"log_level":"info","multus":false}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.KubeconfigPath(); got != "/etc/cni/net.d/ZZZ-consul-cni-kubeconfig" {
		t.Fatalf("kubeconfig path %q", got)
	}
}
