package testbed

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestProgramsList(t *testing.T) {
	progs, err := ParsePrograms(programsTxt)
	if err != nil {
		t.Fatal(err)
	}
	// deps.sh reads the file from disk, the testbed embeds it: the same file.
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(root, ProgramsFile)); err != nil || string(b) != programsTxt {
		t.Fatalf("%s on disk differs from the embedded list (%v)", ProgramsFile, err)
	}
	deps, err := os.ReadFile(filepath.Join(root, "test/scripts/deps.sh"))
	if err != nil || !strings.Contains(string(deps), ProgramsFile) {
		t.Fatalf("test/scripts/deps.sh does not read %s (%v)", ProgramsFile, err)
	}
	for _, p := range []string{"ip", "iptables-save", "ip6tables-save", "setpriv", "iperf3", "haproxy"} {
		if progs[p] == "" {
			t.Errorf("%s is not listed", p)
		}
	}
	for _, bad := range []string{"ip", "ip iproute2 extra", "bin/ip iproute2", "ip iproute2\nip iproute2"} {
		if _, err := ParsePrograms(bad); err == nil {
			t.Errorf("ParsePrograms(%q) accepted", bad)
		}
	}
	if p, err := ParsePrograms("# c\n\n  ip  iproute2 # trailing\n"); err != nil || len(p) != 1 || p["ip"] != "iproute2" {
		t.Errorf("comments and blanks: %v %v", p, err)
	}
}

func TestLookPathRefusesUnlisted(t *testing.T) {
	_, err := LookPath("no-such-tool-xyz")
	if err == nil || !strings.Contains(err.Error(), "add it to "+ProgramsFile) {
		t.Fatalf("unlisted program: %v", err)
	}
	if _, err := Command("no-such-tool-xyz"); err == nil {
		t.Fatal("Command ran an unlisted program")
	}
	p := &Pod{Name: "p", NS: "ns"}
	if _, err := p.command(Proc{}, "no-such-tool-xyz"); err == nil {
		t.Fatal("Pod ran an unlisted program")
	}
	// A path is a binary the tests built, not an installed program.
	if got, err := LookPath("/some/built/ferry"); err != nil || got != "/some/built/ferry" {
		t.Fatalf("built binary: %q %v", got, err)
	}
}

// TestEveryProgramListed reads the Go source under test/: no code execs a
// program except through this package's LookPath (so the list is checked
// at run time), and every program named literally in a call that runs one
// is in the list (so a forgotten entry fails here, not on a fresh machine).
func TestEveryProgramListed(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	progs := Programs()
	// Where the program is in calls that run one: right after the Proc
	// argument (Pod.Exec, ExecOK, Start, StartProcess and wrappers), after
	// Proc and a duration (the bench's env.exec), or at a fixed index.
	fixed := map[string]int{
		"Command": 0, "LookPath": 0, "run": 0, "output": 0, "first": 0,
		"CommandContext": 1, "MustCommand": 1, "Program": 1, "execIn": 1, "maStartProcess": 1,
	}
	isProc := func(e ast.Expr) bool {
		cl, ok := e.(*ast.CompositeLit)
		if !ok {
			return false
		}
		switch ty := cl.Type.(type) {
		case *ast.Ident:
			return ty.Name == "Proc"
		case *ast.SelectorExpr:
			return ty.Sel.Name == "Proc"
		}
		return false
	}
	seen := 0
	fset := token.NewFileSet()
	err = filepath.WalkDir(filepath.Join(root, "test"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "tools" {
			return filepath.SkipDir // the pinned-tools module builds Consul, runs nothing
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			var name string
			switch fn := call.Fun.(type) {
			case *ast.SelectorExpr:
				name = fn.Sel.Name
				if x, ok := fn.X.(*ast.Ident); ok && x.Name == "exec" && rel != filepath.Join("test", "testbed", "programs.go") {
					t.Errorf("%s: exec.%s: run programs through testbed.Command or testbed.LookPath, which check %s",
						fset.Position(call.Pos()), name, ProgramsFile)
				}
			case *ast.Ident:
				name = fn.Name
			}
			idx, ok := fixed[name]
			if !ok {
				idx = -1
				for i, a := range call.Args {
					if isProc(a) {
						idx = i + 1
						if name == "exec" {
							idx++
						}
						break
					}
				}
			}
			if idx < 0 || idx >= len(call.Args) || rel == filepath.Join("test", "testbed", "programs_test.go") {
				return true
			}
			lit, ok := call.Args[idx].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return true
			}
			prog, err := strconv.Unquote(lit.Value)
			if err != nil || strings.Contains(prog, "/") {
				return true
			}
			seen++
			if progs[prog] == "" {
				t.Errorf("%s: %s runs %q, which is not in %s: add it there", fset.Position(lit.Pos()), name, prog, ProgramsFile)
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen < 20 {
		t.Fatalf("found only %d program names in test/: the scan is broken", seen)
	}
}
