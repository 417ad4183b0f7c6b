package inject

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	yaml2 "go.yaml.in/yaml/v2"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// templatePaths is where each workload kind keeps its pod template; a Pod
// is its own template.
var templatePaths = map[string][]string{
	"v1/Pod":                   {},
	"v1/ReplicationController": {"spec", "template"},
	"apps/v1/Deployment":       {"spec", "template"},
	"apps/v1/StatefulSet":      {"spec", "template"},
	"apps/v1/DaemonSet":        {"spec", "template"},
	"apps/v1/ReplicaSet":       {"spec", "template"},
	"batch/v1/Job":             {"spec", "template"},
	"batch/v1/CronJob":         {"spec", "jobTemplate", "spec", "template"},
}

// Outcome is what happened to one object of a manifest.
type Outcome struct {
	Kind, Namespace, Name string
	Injected              bool
	Skip                  string // why not, when not injected
}

func (o Outcome) String() string {
	id := o.Kind + " " + o.Name
	if o.Namespace != "" {
		id = o.Kind + " " + o.Namespace + "/" + o.Name
	}
	if o.Injected {
		return id + ": injected"
	}
	return id + ": unchanged: " + o.Skip
}

// Manifest reads Kubernetes objects (multi-document YAML or JSON, List
// objects included) from r and writes them to w with every pod template
// injected. Documents that need no injection are written back byte for
// byte; injected ones are re-encoded (sorted keys, no comments), with every
// field the API types do not know kept. labels gives the namespace labels
// by namespace name (nil: none). Nothing is written if any object is
// refused.
func Manifest(cfg Config, labels func(ns string) map[string]string, r io.Reader, w io.Writer) ([]Outcome, error) {
	rd := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var out bytes.Buffer
	var outcomes []Outcome
	for n := 1; ; n++ {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		if blank(doc) {
			continue
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		v, err := decodeJSON(js)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		obj, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("document %d: not a Kubernetes object", n)
		}
		changed, oc, err := injectObject(cfg, labels, obj)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		outcomes = append(outcomes, oc...)
		if out.Len() > 0 {
			out.WriteString("---\n")
		}
		if !changed {
			out.Write(bytes.TrimLeft(trimSeparator(doc), "\n"))
			if !bytes.HasSuffix(doc, []byte("\n")) {
				out.WriteByte('\n')
			}
			continue
		}
		// The original's key order, so that a diff of the output shows
		// only what injection changed.
		var ref yaml2.MapSlice
		if yaml2.Unmarshal(doc, &ref) != nil {
			ref = nil
		}
		y, err := yaml2.Marshal(ordered(obj, ref))
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		out.Write(y)
	}
	if _, err := w.Write(out.Bytes()); err != nil {
		return nil, err
	}
	return outcomes, nil
}

// ordered turns an untyped JSON value into YAML-encodable form with each
// object's keys in the order ref (the original document) has them, new
// keys after them in sorted order. Array elements are matched to ref's by
// name when they have one, else by position.
func ordered(v any, ref any) any {
	switch v := v.(type) {
	case map[string]any:
		refMap, _ := ref.(yaml2.MapSlice)
		out := make(yaml2.MapSlice, 0, len(v))
		seen := map[string]bool{}
		for _, it := range refMap {
			k, ok := it.Key.(string)
			if val, present := v[k]; ok && present && !seen[k] {
				out = append(out, yaml2.MapItem{Key: k, Value: ordered(val, it.Value)})
				seen[k] = true
			}
		}
		for _, k := range sortedKeys(v) {
			if !seen[k] {
				out = append(out, yaml2.MapItem{Key: k, Value: ordered(v[k], nil)})
			}
		}
		return out
	case []any:
		refs, _ := ref.([]any)
		byName := map[string]any{}
		for _, r := range refs {
			if m, ok := r.(yaml2.MapSlice); ok {
				for _, it := range m {
					if name, ok := it.Value.(string); ok && it.Key == "name" {
						byName[name] = r
					}
				}
			}
		}
		out := make([]any, len(v))
		for i, e := range v {
			var r any
			if m, ok := e.(map[string]any); ok && m["name"] != nil {
				if name, ok := m["name"].(string); ok {
					r = byName[name] // a new named element has no reference
				}
			} else if i < len(refs) {
				r = refs[i]
			}
			out[i] = ordered(e, r)
		}
		return out
	default:
		return v
	}
}

// blank is a document holding only comments and whitespace.
func blank(doc []byte) bool {
	for _, line := range strings.Split(string(doc), "\n") {
		t := strings.TrimSpace(line)
		if t != "" && !strings.HasPrefix(t, "#") && t != "---" {
			return false
		}
	}
	return true
}

// trimSeparator drops a leading "---" line the reader may leave on a
// document, since Manifest writes its own separators.
func trimSeparator(doc []byte) []byte {
	if bytes.HasPrefix(doc, []byte("---\n")) {
		return doc[4:]
	}
	return doc
}

func str(m map[string]any, keys ...string) string {
	var v any = m
	for _, k := range keys {
		mm, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = mm[k]
	}
	s, _ := v.(string)
	return s
}

// injectObject injects obj's pod template in place, or each item of a
// List, and says whether anything changed.
func injectObject(cfg Config, labels func(string) map[string]string, obj map[string]any) (bool, []Outcome, error) {
	apiVersion, kind := str(obj, "apiVersion"), str(obj, "kind")
	if items, ok := obj["items"].([]any); ok && strings.HasSuffix(kind, "List") {
		changed := false
		var outcomes []Outcome
		for i, it := range items {
			m, ok := it.(map[string]any)
			if !ok {
				return false, nil, fmt.Errorf("%s item %d: not a Kubernetes object", kind, i)
			}
			c, oc, err := injectObject(cfg, labels, m)
			if err != nil {
				return false, nil, fmt.Errorf("%s item %d: %w", kind, i, err)
			}
			changed = changed || c
			outcomes = append(outcomes, oc...)
		}
		return changed, outcomes, nil
	}
	path, ok := templatePaths[apiVersion+"/"+kind]
	if !ok {
		return false, nil, nil
	}
	oc := Outcome{Kind: kind, Namespace: str(obj, "metadata", "namespace"), Name: str(obj, "metadata", "name")}
	tmpl := obj
	for _, k := range path {
		next, ok := tmpl[k].(map[string]any)
		if !ok {
			return false, nil, fmt.Errorf("%s %s: no %s", kind, oc.Name, strings.Join(path, "."))
		}
		tmpl = next
	}
	ns := Namespace{Name: oc.Namespace}
	if labels != nil {
		ns.Labels = labels(ns.Name)
	}
	changed, skip, err := injectTemplate(cfg, ns, tmpl)
	if err != nil {
		return false, nil, fmt.Errorf("%s %s: %w", kind, oc.Name, err)
	}
	oc.Injected, oc.Skip = changed, skip
	return changed, []Outcome{oc}, nil
}

// injectTemplate injects a pod (or pod template: metadata and spec) held
// as untyped JSON, by patching it with the difference the typed injection
// made, so that fields outside the API types are kept.
func injectTemplate(cfg Config, ns Namespace, tmpl map[string]any) (bool, string, error) {
	podDoc := map[string]any{"metadata": tmpl["metadata"], "spec": tmpl["spec"]}
	if podDoc["metadata"] == nil {
		podDoc["metadata"] = map[string]any{}
	}
	raw, err := json.Marshal(podDoc)
	if err != nil {
		return false, "", err
	}
	var pod corev1.Pod
	if err := kjson.UnmarshalCaseSensitivePreserveInts(raw, &pod); err != nil {
		return false, "", fmt.Errorf("not a valid pod template: %w", err)
	}
	out, skip, err := Pod(cfg, ns, &pod)
	if err != nil || skip != "" {
		return false, skip, err
	}
	ops, err := PodPatch(&pod, out)
	if err != nil {
		return false, "", err
	}
	patched, err := Apply(podDoc, ops)
	if err != nil {
		return false, "", err
	}
	pm := patched.(map[string]any)
	tmpl["metadata"], tmpl["spec"] = pm["metadata"], pm["spec"]
	return true, "", nil
}

// PodPatch is the JSON patch from pod a to pod b, both as the API types
// encode them.
func PodPatch(a, b *corev1.Pod) ([]Op, error) {
	ja, err := json.Marshal(a)
	if err != nil {
		return nil, err
	}
	jb, err := json.Marshal(b)
	if err != nil {
		return nil, err
	}
	return DiffJSON(ja, jb)
}
