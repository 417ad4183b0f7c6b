package dockerenv

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ComposeBinary builds Docker Compose v2 from the tools module in
// test/tools/compose into .cache/bin/docker-compose, once per go.sum (the
// first build takes a few minutes); a file lock keeps parallel callers from
// building twice.
func ComposeBinary(ctx context.Context, root string, logf func(string, ...any)) (string, error) {
	mod := filepath.Join(root, "test", "tools", "compose")
	sum, err := os.ReadFile(filepath.Join(mod, "go.sum"))
	if err != nil {
		return "", fmt.Errorf("dockerenv: read compose tools go.sum: %w", err)
	}
	h := sha256.Sum256(sum)
	stamp := hex.EncodeToString(h[:8])
	out := filepath.Join(root, ".cache", "bin", "docker-compose")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", fmt.Errorf("dockerenv: lock %s: %w", out, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if old, err := os.ReadFile(out + ".stamp"); err == nil && strings.TrimSpace(string(old)) == stamp {
		if _, err := os.Stat(out); err == nil {
			return out, nil
		}
	}
	logf("dockerenv: building Docker Compose from test/tools/compose (once; a few minutes)")
	begin := time.Now()
	ldflags := ""
	if v := composeVersion(mod); v != "" {
		ldflags = "-X github.com/docker/compose/v5/internal.Version=" + v
	}
	cmd := command(ctx, "go", "build", "-C", mod, "-ldflags", ldflags, "-o", out, "github.com/docker/compose/v5/cmd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("dockerenv: build compose: %w\n%s", err, b)
	}
	logf("dockerenv: built %s in %v", out, time.Since(begin).Round(time.Second))
	return out, os.WriteFile(out+".stamp", []byte(stamp+"\n"), 0o644)
}

// Compose runs one compose project against the engine.
type Compose struct {
	D       *Docker
	Binary  string
	File    string   // compose file
	Project string   // -p
	Env     []string // extra environment (port overrides)
}

func (c *Compose) command(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"-f", c.File, "-p", c.Project}, args...)
	cmd := command(ctx, c.Binary, full...)
	cmd.Env = append(c.D.Env(), c.Env...)
	cmd.Dir = filepath.Dir(c.File)
	return cmd
}

// Run runs compose with combined output, returned on error.
func (c *Compose) Run(ctx context.Context, args ...string) (string, error) {
	out, err := c.command(ctx, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("compose %s: %w\n%s", strings.Join(args, " "), err, tailLines(string(out), 40))
	}
	return string(out), nil
}

// composeVersion is the version of Compose the tools module requires.
func composeVersion(mod string) string {
	b, err := os.ReadFile(filepath.Join(mod, "go.mod"))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "github.com/docker/compose/v5" {
			return f[1]
		}
	}
	return ""
}
