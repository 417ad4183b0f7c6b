package testbed

import (
	"context"
	_ "embed"
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

// ProgramsFile is where the list of external programs lives, relative to
// the repository root; test/scripts/deps.sh installs from the same file.
const ProgramsFile = "test/testbed/programs.txt"

//go:embed programs.txt
var programsTxt string

// ParsePrograms parses the programs list: "program package" per line, #
// comments and blank lines ignored.
func ParsePrograms(text string) (map[string]string, error) {
	progs := map[string]string{}
	for i, line := range strings.Split(text, "\n") {
		if c, _, ok := strings.Cut(line, "#"); ok {
			line = c
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
			continue
		case len(f) != 2:
			return nil, fmt.Errorf("%s:%d: want \"program package\", got %q", ProgramsFile, i+1, strings.TrimSpace(line))
		case strings.Contains(f[0], "/") && !strings.HasPrefix(f[0], "/"):
			// An absolute path names a program off PATH (the CNI plugins).
			return nil, fmt.Errorf("%s:%d: %q: a program name or an absolute path", ProgramsFile, i+1, f[0])
		}
		if _, dup := progs[f[0]]; dup {
			return nil, fmt.Errorf("%s:%d: %s listed twice", ProgramsFile, i+1, f[0])
		}
		progs[f[0]] = f[1]
	}
	return progs, nil
}

// Programs returns the programs list (program -> Debian package).
func Programs() map[string]string {
	p, err := ParsePrograms(programsTxt)
	if err != nil {
		panic(err) // TestProgramsList keeps the embedded file valid
	}
	return p
}

// LookPath finds an external program the tests may run. A name with a
// slash is a binary built by the tests (ferry, consul, the test apps) and
// is returned as is. Any other name must be in the programs list, so that
// a fresh machine gets it from deps.sh; an unlisted or missing program is
// an error that says what to do.
func LookPath(name string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	pkg, ok := Programs()[name]
	if !ok {
		return "", fmt.Errorf("testbed: program %q is not in the programs list: add it to %s (program and Debian package) so that test/scripts/deps.sh installs it", name, ProgramsFile)
	}
	path, err := exec.LookPath(name)
	if err != nil {
		how := "run test/scripts/deps.sh (make deps) to install package " + pkg
		if pkg == "-" {
			how = "install it (a prerequisite, not installed by deps.sh)"
		}
		return "", fmt.Errorf("testbed: program %q not found: %s: %w", name, how, err)
	}
	return path, nil
}

// Program is LookPath that fails the test.
func Program(t testing.TB, name string) string {
	t.Helper()
	p, err := LookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Command is exec.Command for a program checked by LookPath; every external
// program the tests, demo and bench run goes through it (or through Pod,
// which uses it).
func Command(name string, args ...string) (*exec.Cmd, error) {
	return CommandContext(context.Background(), name, args...)
}

// CommandContext is Command with a context.
func CommandContext(ctx context.Context, name string, args ...string) (*exec.Cmd, error) {
	path, err := LookPath(name)
	if err != nil {
		return nil, err
	}
	return exec.CommandContext(ctx, path, args...), nil
}

// MustCommand is Command that fails the test.
func MustCommand(t testing.TB, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd, err := Command(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return cmd
}

// run runs a listed program and returns its combined output.
func run(name string, args ...string) ([]byte, error) {
	cmd, err := Command(name, args...)
	if err != nil {
		return nil, err
	}
	return cmd.CombinedOutput()
}

// output runs a listed program and returns its standard output.
func output(name string, args ...string) ([]byte, error) {
	cmd, err := Command(name, args...)
	if err != nil {
		return nil, err
	}
	return cmd.Output()
}
