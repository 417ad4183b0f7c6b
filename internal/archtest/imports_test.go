package archtest

import (
	"bufio"
	"bytes"
	"fmt"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/ferrymesh/ferry/"

// rules lists, for every package of ours (path below the module), the
// packages of ours its production code may import. A new package fails the
// test until it has a line here: add it with the fewest edges that work,
// and keep docs/architecture.md's table in step.
var rules = map[string][]string{
	// The wiring: flags → Config → run.
	"cmd/ferry": {"dns", "proxy", "proxy/catalog", "proxy/intentions", "redirect", "listener", "mtls", "cni", "inject", "proxy/servers", "ktls", "proxy/consulguard", "internal/certfile"},

	// The sidecar: routing, the acceptors, the sidecar's wiring.
	"proxy": {"listener", "mtls", "ktls", "proxy/pump", "proxy/tunnel", "proxy/catalog", "proxy/intentions", "proxy/expose", "proxy/mergedmetrics"},
	// Tunnels between sidecars: frames, the session pool, ALPN.
	"proxy/tunnel": {"proxy/pump"},
	// The byte mover, the mesh view: leaves.
	"proxy/pump": {},
	// Agentless mode: the Consul servers, failover, ACL login.
	"proxy/servers":       {"proxy/consulguard"},
	"proxy/consulguard":   {}, // bounded Consul API answers under consul/api
	"proxy/catalog":       {},
	"proxy/intentions":    {},
	"proxy/expose":        {}, // Expose.Paths: plain-HTTP listeners for probes
	"proxy/mergedmetrics": {}, // envoy_prometheus_bind_addr: ferry's and the app's metrics merged

	// Leaves: the kernel, the network, TLS, DNS.
	"listener": {},
	"mtls":     {},
	"redirect": {},
	"dns":      {"listener"}, // reads the mesh view through an interface cmd/ferry fills
	"ktls":     {},           // crypto/tls sessions handed to kernel TLS

	// Packages landing next (issue 21's notes): listed so that they pass
	// the day they land, with the edges planned for them.
	"cni":    {"redirect"},
	"inject": {"redirect", "internal/certfile"},

	// The compose example's app: a stand-alone program, nothing of ours.
	"examples/compose/app": {},

	// Test support: imported by tests only (see testOnly).
	"mtls/mtlstest":     {"mtls", "internal/testkit"},
	"internal/certfile": {}, // TLS files reloaded when they change (webhook, merged metrics)
	"internal/testkit":  {},
	"internal/umlinit":  {}, // a test binary as init of a UML kernel (test/uml)
	"internal/archtest": {},
}

// testOnly packages may be imported by tests and by test/, never by
// production code.
var testOnly = []string{"mtls/mtlstest", "internal/testkit", "internal/umlinit"}

// anything marks packages whose imports are not restricted: the test tree
// (testbed, e2e, bench, demo, test apps) may use whatever it exercises.
func anything(pkg string) bool { return pkg == "test" || strings.HasPrefix(pkg, "test/") }

type pkg struct {
	path        string   // below the module
	imports     []string // production imports of ours
	testImports []string // imports of ours by its _test.go files
}

// check returns one message per import pointing the wrong way, and per
// package without a rule.
func check(pkgs []pkg) []string {
	var bad []string
	for _, p := range pkgs {
		if anything(p.path) {
			continue
		}
		allowed, ok := rules[p.path]
		if !ok {
			bad = append(bad, fmt.Sprintf("package %s has no import rule: add it to rules in internal/archtest/imports_test.go (and to docs/architecture.md) with the packages of ours it may import", p.path))
			continue
		}
		for _, imp := range p.imports {
			switch {
			case imp == "cmd" || strings.HasPrefix(imp, "cmd/"):
				bad = append(bad, fmt.Sprintf("%s imports %s: nothing imports cmd/", p.path, imp))
			case anything(imp):
				bad = append(bad, fmt.Sprintf("%s imports %s: production code never imports test/", p.path, imp))
			case slices.Contains(testOnly, imp) && !slices.Contains(testOnly, p.path):
				bad = append(bad, fmt.Sprintf("%s imports %s: it is for tests only", p.path, imp))
			case !slices.Contains(allowed, imp):
				bad = append(bad, fmt.Sprintf("%s imports %s: not allowed (it may import %s); imports point the way a connection flows, see docs/architecture.md", p.path, imp, list(allowed)))
			}
		}
		for _, imp := range p.testImports {
			// Tests may also use the test support packages, the package
			// itself (external tests), and what their package may import.
			if imp == p.path || slices.Contains(testOnly, imp) || slices.Contains(allowed, imp) {
				continue
			}
			if imp == "cmd" || strings.HasPrefix(imp, "cmd/") || anything(imp) {
				bad = append(bad, fmt.Sprintf("tests of %s import %s: nothing imports cmd/ or test/", p.path, imp))
				continue
			}
			// A package's tests may reach its siblings lower in the
			// graph (proxy's tests build catalog views); never upward.
			if reaches(imp, p.path) {
				bad = append(bad, fmt.Sprintf("tests of %s import %s, which imports %s: the import points the wrong way", p.path, imp, p.path))
			}
		}
	}
	sort.Strings(bad)
	return bad
}

// reaches reports whether from may import to under the rules, directly or
// through others.
func reaches(from, to string) bool {
	seen := map[string]bool{}
	var walk func(string) bool
	walk = func(p string) bool {
		if p == to {
			return true
		}
		if seen[p] {
			return false
		}
		seen[p] = true
		for _, next := range rules[p] {
			if walk(next) {
				return true
			}
		}
		return false
	}
	return from != to && walk(from)
}

func list(s []string) string {
	if len(s) == 0 {
		return "nothing of ours"
	}
	return strings.Join(s, ", ")
}

// goList lists every package of the module with its imports of ours.
func goList(t *testing.T) []pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-f",
		"{{.ImportPath}}|{{join .Imports \" \"}}|{{join .TestImports \" \"}} {{join .XTestImports \" \"}}",
		module+"...").Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("go list: %v\n%s", err, stderr)
	}
	ours := func(s string) []string {
		var r []string
		for _, f := range strings.Fields(s) {
			if p, ok := strings.CutPrefix(f, module); ok && !slices.Contains(r, p) {
				r = append(r, p)
			}
		}
		return r
	}
	var pkgs []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), "|", 3)
		if len(parts) != 3 {
			continue
		}
		pkgs = append(pkgs, pkg{path: strings.TrimPrefix(parts[0], module), imports: ours(parts[1]), testImports: ours(parts[2])})
	}
	if len(pkgs) < 5 {
		t.Fatalf("go list found %d packages; want the whole module:\n%s", len(pkgs), out)
	}
	return pkgs
}

// TestImportGraph fails when an import points the wrong way.
func TestImportGraph(t *testing.T) {
	for _, msg := range check(goList(t)) {
		t.Error(msg)
	}
}

// The checker itself: each kind of wrong import is caught, and the
// current graph's shape passes.
func TestCheckCatchesWrongWay(t *testing.T) {
	good := []pkg{
		{path: "cmd/ferry", imports: []string{"proxy", "dns", "redirect"}},
		{path: "proxy", imports: []string{"listener", "mtls", "proxy/pump"}, testImports: []string{"internal/testkit", "mtls/mtlstest", "proxy/catalog"}},
		{path: "proxy/pump", testImports: []string{"internal/testkit"}},
		{path: "test/e2e", testImports: []string{"proxy", "test/testbed"}},
	}
	if bad := check(good); len(bad) != 0 {
		t.Fatalf("the intended graph fails: %v", bad)
	}
	for _, tc := range []struct {
		name string
		p    pkg
		want string
	}{
		{"leaf imports upward", pkg{path: "proxy/pump", imports: []string{"proxy"}}, "proxy/pump imports proxy: not allowed"},
		{"leaf imports a sibling", pkg{path: "listener", imports: []string{"mtls"}}, "listener imports mtls: not allowed"},
		{"dns imports the view", pkg{path: "dns", imports: []string{"proxy/catalog"}}, "dns imports proxy/catalog"},
		{"production imports testkit", pkg{path: "proxy", imports: []string{"internal/testkit"}}, "for tests only"},
		{"production imports test/", pkg{path: "proxy", imports: []string{"test/testbed"}}, "never imports test/"},
		{"production imports cmd", pkg{path: "proxy", imports: []string{"cmd/ferry"}}, "nothing imports cmd/"},
		{"tests import upward", pkg{path: "proxy/pump", testImports: []string{"proxy"}}, "points the wrong way"},
		{"unknown package", pkg{path: "proxy/agentless"}, "has no import rule: add it to rules in internal/archtest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := check([]pkg{tc.p})
			if len(bad) != 1 || !strings.Contains(bad[0], tc.want) {
				t.Fatalf("check = %q; want one message containing %q", bad, tc.want)
			}
		})
	}
}
