package inject

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/golden")

// testConfig is the stock configuration with a fixed cluster DNS (the
// injector's resolv.conf in a kind cluster, with the release namespace
// "consul").
func testConfig() Config {
	cfg := DefaultConfig()
	cfg.DNS = DNSConfig{
		Nameservers: []string{"10.96.0.10"},
		Searches:    []string{"consul.svc.cluster.local", "svc.cluster.local", "cluster.local"},
		Ndots:       5, Timeout: 5, Attempts: 2,
	}
	return cfg
}

func runManifest(t *testing.T, cfg Config, in []byte) ([]byte, []Outcome) {
	t.Helper()
	var out bytes.Buffer
	oc, err := Manifest(cfg, nil, bytes.NewReader(in), &out)
	if err != nil {
		t.Fatalf("Manifest: %v", err)
	}
	return out.Bytes(), oc
}

// TestManifestGolden injects real-world manifests and compares them with
// the reviewed output; -update rewrites it.
func TestManifestGolden(t *testing.T) {
	ins, err := filepath.Glob("testdata/golden/*.in.yaml")
	if err != nil || len(ins) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	for _, in := range ins {
		name := strings.TrimSuffix(filepath.Base(in), ".in.yaml")
		t.Run(name, func(t *testing.T) {
			src, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			got, outcomes := runManifest(t, testConfig(), src)
			var log strings.Builder
			for _, o := range outcomes {
				log.WriteString("# " + o.String() + "\n")
			}
			got = append([]byte(log.String()), got...)
			golden := strings.TrimSuffix(in, ".in.yaml") + ".golden.yaml"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("output differs from %s (run with -update and review the diff):\n%s", golden, got)
			}
		})
	}
}

// TestManifestOutputDecodesStrictly decodes every injected object into its
// API type with unknown fields refused: ferry writes only real fields.
func TestManifestOutputDecodesStrictly(t *testing.T) {
	ins, _ := filepath.Glob("testdata/golden/*.in.yaml")
	for _, in := range ins {
		src, err := os.ReadFile(in)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := runManifest(t, testConfig(), src)
		for i, doc := range splitDocs(t, out) {
			var meta struct{ APIVersion, Kind string }
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("%s doc %d: %v", in, i, err)
			}
			var obj any
			switch meta.APIVersion + "/" + meta.Kind {
			case "v1/Pod":
				obj = &corev1.Pod{}
			case "v1/Service":
				obj = &corev1.Service{}
			case "v1/List":
				obj = &corev1.List{}
			case "apps/v1/Deployment":
				obj = &appsv1.Deployment{}
			case "apps/v1/StatefulSet":
				obj = &appsv1.StatefulSet{}
			case "apps/v1/DaemonSet":
				obj = &appsv1.DaemonSet{}
			case "batch/v1/Job":
				obj = &batchv1.Job{}
			case "batch/v1/CronJob":
				obj = &batchv1.CronJob{}
			default:
				t.Fatalf("%s doc %d: unexpected kind %s", in, i, meta.Kind)
			}
			if err := yaml.UnmarshalStrict(doc, obj); err != nil {
				// The one input field the API types do not know is
				// carried through on purpose.
				if strings.Contains(err.Error(), `unknown field "futureField"`) {
					continue
				}
				t.Errorf("%s doc %d (%s): strict decode: %v", in, i, meta.Kind, err)
			}
		}
	}
}

func splitDocs(t *testing.T, b []byte) [][]byte {
	t.Helper()
	rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var docs [][]byte
	for {
		d, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatal(err)
		}
		if !blank(d) {
			docs = append(docs, d)
		}
	}
}

// TestManifestIdempotent: injecting the output again changes nothing.
func TestManifestIdempotent(t *testing.T) {
	ins, _ := filepath.Glob("testdata/golden/*.in.yaml")
	for _, in := range ins {
		src, err := os.ReadFile(in)
		if err != nil {
			t.Fatal(err)
		}
		once, _ := runManifest(t, testConfig(), src)
		twice, outcomes := runManifest(t, testConfig(), once)
		if !bytes.Equal(once, twice) {
			t.Errorf("%s: injecting twice differs from injecting once:\n--- once\n%s\n--- twice\n%s", in, once, twice)
		}
		for _, o := range outcomes {
			if o.Injected {
				t.Errorf("%s: %s injected a second time", in, o)
			}
		}
	}
}

// TestManifestJSONList: kubectl's JSON output (a List) is injected too.
func TestManifestJSONList(t *testing.T) {
	in := `{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"shop","resourceVersion":"42"},` +
		`"spec":{"selector":{"matchLabels":{"app":"web"}},"template":{"metadata":{"labels":{"app":"web"},"annotations":{"consul.hashicorp.com/connect-inject":"true"}},` +
		`"spec":{"containers":[{"name":"web","image":"web:1"}]}}},"status":{"replicas":1}}]}`
	out, oc := runManifest(t, testConfig(), []byte(in))
	if len(oc) != 1 || !oc[0].Injected {
		t.Fatalf("outcomes %v", oc)
	}
	var list corev1.List
	if err := yaml.UnmarshalStrict(out, &list); err != nil {
		t.Fatal(err)
	}
	var d appsv1.Deployment
	if err := yaml.UnmarshalStrict(list.Items[0].Raw, &d); err != nil {
		t.Fatal(err)
	}
	if d.ResourceVersion != "42" || d.Status.Replicas != 1 || len(d.Spec.Template.Spec.InitContainers) != 1 || len(d.Spec.Template.Spec.Containers) != 2 {
		t.Errorf("deployment %+v", d)
	}
}

// FuzzManifest: any input is either refused with an error or injected into
// objects that decode, and injecting the output again changes nothing.
func FuzzManifest(f *testing.F) {
	ins, _ := filepath.Glob("testdata/golden/*.in.yaml")
	for _, in := range ins {
		b, err := os.ReadFile(in)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var out bytes.Buffer
		if _, err := Manifest(testConfig(), nil, bytes.NewReader(in), &out); err != nil {
			if out.Len() != 0 {
				t.Fatalf("output written although Manifest failed: %v", err)
			}
			return
		}
		var again bytes.Buffer
		if _, err := Manifest(testConfig(), nil, bytes.NewReader(out.Bytes()), &again); err != nil {
			t.Fatalf("re-injecting the output: %v\n%s", err, out.Bytes())
		}
		if !bytes.Equal(out.Bytes(), again.Bytes()) {
			t.Fatalf("not idempotent:\n--- once\n%s\n--- twice\n%s", out.Bytes(), again.Bytes())
		}
	})
}
