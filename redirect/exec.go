package redirect

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// ExecBackend drives the iptables binaries of the current network
// namespace: one `iptables -t nat -S` to read the table, one
// `iptables-restore --noflush` to change it.
//
// go-iptables finds the binary and checks that it runs (version, nft or
// legacy mode) when the backend is made, so a missing or broken iptables is
// reported before anything else happens. It is not used to read the table:
// its listing runs one process per chain, which is not a snapshot. A
// concurrent run that deletes a chain between two of those calls makes the
// read fail ("chain ... is incompatible", seen in
// TestConcurrentRunsRealKernel). It has no transactional write either.
//
// Both commands exec child processes. A child inherits the network
// namespace of the OS thread that forks it, so callers that want another
// namespace make the backend and call every method inside InNetNS (see
// netns.go).
type ExecBackend struct {
	family      Family
	path        string
	restorePath string
}

// NewExecBackend finds iptables (or ip6tables) and its restore companion.
func NewExecBackend(f Family) (*ExecBackend, error) {
	proto := iptables.ProtocolIPv4
	if f == IPv6 {
		proto = iptables.ProtocolIPv6
	}
	if _, err := iptables.New(iptables.IPFamily(proto)); err != nil {
		return nil, fmt.Errorf("redirect: %s: %w", f.Command(), err)
	}
	path, err := exec.LookPath(f.Command())
	if err != nil {
		return nil, fmt.Errorf("redirect: %w", err)
	}
	restore, err := exec.LookPath(f.Command() + "-restore")
	if err != nil {
		return nil, fmt.Errorf("redirect: %w", err)
	}
	return &ExecBackend{family: f, path: path, restorePath: restore}, nil
}

// List implements Backend.
func (b *ExecBackend) List(ctx context.Context) ([]string, error) {
	cmd := exec.CommandContext(ctx, b.path, "-t", Table, "-S", "--wait")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s -t %s -S: %w: %s", b.path, Table, err, strings.TrimSpace(stderr.String()))
	}
	return strings.Split(strings.TrimRight(stdout.String(), "\n"), "\n"), nil
}

// Restore implements Backend.
func (b *ExecBackend) Restore(ctx context.Context, data string, testOnly bool) error {
	args := []string{"--noflush", "--wait"}
	if testOnly {
		args = append(args, "--test")
	}
	cmd := exec.CommandContext(ctx, b.restorePath, args...)
	cmd.Stdin = strings.NewReader(data)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", b.restorePath, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
