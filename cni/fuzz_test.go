package cni

import (
	"errors"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	corev1 "k8s.io/api/core/v1"
)

// FuzzAdd feeds arbitrary network configs, CNI_ARGS and annotations to
// ADD: it must never panic, every failure must be a CNI error result, and
// a failure must apply nothing and print nothing.
func FuzzAdd(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ferry-cni","prevResult":`+prev100+`}`),
		"IgnoreUnknown=1;CONSUL_IPTABLES_CONFIG="+testConfigJSON, "")
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"n","type":"ferry-cni","kubeconfig":"kc"}`),
		"K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web", `{"ProxyUserID":"1","ProxyInboundPort":1,"ExcludeOutboundCIDRs":["::/0"]}`)
	f.Add([]byte(`{}`), "a=b=c;;", `{"ConsulDNSIP":"::1","ConsulDNSPort":70000}`)
	f.Fuzz(func(t *testing.T, stdin []byte, args, annotation string) {
		rules := &fakeRules{}
		pods := &fakePods{pods: map[string]*corev1.Pod{"apps/web": pod(map[string]string{AnnotationRedirectConfig: annotation})}}
		p, out := testPlugin(rules, pods)
		err := p.Add(&skel.CmdArgs{ContainerID: "c", Netns: "/run/netns/x", IfName: "eth0", Args: args, StdinData: stdin})
		if err == nil {
			return
		}
		var te *types.Error
		if !errors.As(err, &te) || te.Code == 0 || te.Msg == "" {
			t.Fatalf("not a CNI error result: %#v", err)
		}
		if len(rules.applied) != 0 || out.Len() != 0 {
			t.Fatalf("failed ADD applied %v / printed %q", rules.applied, out)
		}
	})
}
