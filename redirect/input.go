package redirect

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Annotation keys consul-k8s puts on a pod (reference §2.1).
const (
	AnnotationTransparentProxy     = "consul.hashicorp.com/transparent-proxy"
	AnnotationExcludeInboundPorts  = "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports"
	AnnotationExcludeOutboundPorts = "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports"
	AnnotationExcludeOutboundCIDRs = "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs"
	AnnotationExcludeUIDs          = "consul.hashicorp.com/transparent-proxy-exclude-uids"
)

// EnvRedirectConfig is the variable consul-k8s sets on its init container.
const EnvRedirectConfig = "CONSUL_REDIRECT_TRAFFIC_CONFIG"

// consul-k8s's dual-stack switch (Helm global.dualStack.enabled): the
// variable on its init container, the annotation the CNI plugin reads.
const (
	EnvDualStack        = "CONSUL_DUAL_STACK"
	AnnotationDualStack = "consul.hashicorp.com/dual-stack"
)

// DualStack reads consul-k8s's dual-stack switch from the environment
// value env (of EnvDualStack) and the annotations, the annotation winning.
// set is false when neither says anything. "true" asks for the IPv6 rules
// as -ipv6 does; "false" is consul-k8s's default and asks nothing of ferry,
// which still installs them wherever the namespace has IPv6 (fail closed).
func DualStack(env string, ann map[string]string) (on, set bool, source string, err error) {
	parse := func(v, src string) error {
		b, perr := strconv.ParseBool(strings.TrimSpace(v))
		if perr != nil {
			return fmt.Errorf("invalid %s %q: not a boolean", src, v)
		}
		on, set, source = b, true, src
		return nil
	}
	if env != "" {
		if err := parse(env, EnvDualStack); err != nil {
			return false, false, "", err
		}
	}
	if v, ok := ann[AnnotationDualStack]; ok {
		if err := parse(v, "annotation "+AnnotationDualStack); err != nil {
			return false, false, "", err
		}
	}
	return on, set, source, nil
}

// SplitList splits a comma list into trimmed elements, each labelled with
// source. An empty element (",,", a trailing comma, a blank value) is an
// error: Consul passes it on to iptables, which fails half-way through.
func SplitList(source, value string) ([]Item, error) {
	parts := strings.Split(value, ",")
	items := make([]Item, 0, len(parts))
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if p == "" {
			return nil, fmt.Errorf("invalid %s %q: element %d of the comma list is empty", source, value, i+1)
		}
		items = append(items, Item{Value: p, Source: source})
	}
	return items, nil
}

// ParseAnnotations reads a Kubernetes downward-API annotations file: one
// `key="value"` per line, the value a Go-style quoted string (that is what
// the kubelet writes). Blank lines are skipped.
func ParseAnnotations(r io.Reader) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		key, quoted, ok := strings.Cut(line, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("annotations line %d: want key=\"value\", got %q", n, line)
		}
		val, err := strconv.Unquote(quoted)
		if err != nil || !strings.HasPrefix(quoted, `"`) {
			return nil, fmt.Errorf("annotations line %d: value of %s is not a quoted string: %q", n, key, quoted)
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("annotations line %d: %s appears twice", n, key)
		}
		out[key] = val
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("annotations: %w", err)
	}
	return out, nil
}

// ApplyAnnotations appends the exclusion annotations to c. enabled is
// false when the pod opted out with transparent-proxy: "false".
func ApplyAnnotations(c *Config, ann map[string]string) (enabled bool, err error) {
	enabled = true
	if v, ok := ann[AnnotationTransparentProxy]; ok {
		b, perr := strconv.ParseBool(strings.TrimSpace(v))
		if perr != nil {
			return false, fmt.Errorf("invalid annotation %s %q: not a boolean", AnnotationTransparentProxy, v)
		}
		enabled = b
	}
	var errs []error
	add := func(key string, dst *[]Item) {
		v, ok := ann[key]
		if !ok {
			return
		}
		items, err := SplitList("annotation "+key, v)
		if err != nil {
			errs = append(errs, err)
			return
		}
		*dst = append(*dst, items...)
	}
	add(AnnotationExcludeInboundPorts, &c.ExcludeInboundPorts)
	add(AnnotationExcludeOutboundPorts, &c.ExcludeOutboundPorts)
	add(AnnotationExcludeOutboundCIDRs, &c.ExcludeOutboundCIDRs)
	add(AnnotationExcludeUIDs, &c.ExcludeUIDs)
	return enabled, errors.Join(errs...)
}

// ConsulJSON mirrors sdk/iptables Config as consul-k8s marshals it: no
// JSON tags, so the keys are the Go field names. ferry inject writes it
// with this same type, so the writer and ParseConsulJSON cannot drift.
type ConsulJSON struct {
	ConsulDNSIP          string
	ConsulDNSPort        int
	ProxyUserID          string
	ProxyInboundPort     int
	ProxyOutboundPort    int
	ExcludeInboundPorts  []string
	ExcludeOutboundPorts []string
	ExcludeOutboundCIDRs []string
	ExcludeUIDs          []string
	NetNS                string
	IptablesProvider     json.RawMessage // always null; accepted and ignored
}

// ParseConsulJSON reads the JSON consul-k8s hands its init container
// (CONSUL_REDIRECT_TRAFFIC_CONFIG) into a Config. Unknown fields are
// refused so a typo does not silently drop an exclusion. netns is the
// NetNS field (the CNI path sets it).
func ParseConsulJSON(data []byte) (c Config, netns string, err error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var j ConsulJSON
	if err := dec.Decode(&j); err != nil {
		return Config{}, "", fmt.Errorf("invalid %s: %w", EnvRedirectConfig, err)
	}
	if dec.More() {
		return Config{}, "", fmt.Errorf("invalid %s: trailing data after the JSON object", EnvRedirectConfig)
	}
	src := func(field string) string { return EnvRedirectConfig + " field " + field }
	num := func(field string, v int) Item {
		if v == 0 {
			return Item{Source: src(field)}
		}
		return Item{Value: strconv.Itoa(v), Source: src(field)}
	}
	list := func(field string, vs []string) []Item {
		var items []Item
		for _, v := range vs {
			items = append(items, Item{Value: v, Source: src(field)})
		}
		return items
	}
	c = Config{
		ProxyUserID:          Item{Value: j.ProxyUserID, Source: src("ProxyUserID")},
		ProxyInboundPort:     num("ProxyInboundPort", j.ProxyInboundPort),
		ProxyOutboundPort:    num("ProxyOutboundPort", j.ProxyOutboundPort),
		ConsulDNSIP:          Item{Value: j.ConsulDNSIP, Source: src("ConsulDNSIP")},
		ConsulDNSPort:        num("ConsulDNSPort", j.ConsulDNSPort),
		ExcludeInboundPorts:  list("ExcludeInboundPorts", j.ExcludeInboundPorts),
		ExcludeOutboundPorts: list("ExcludeOutboundPorts", j.ExcludeOutboundPorts),
		ExcludeOutboundCIDRs: list("ExcludeOutboundCIDRs", j.ExcludeOutboundCIDRs),
		ExcludeUIDs:          list("ExcludeUIDs", j.ExcludeUIDs),
	}
	return c, j.NetNS, nil
}
