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
// namespace. Reading goes through go-iptables (it finds the binary, adds
// --wait where the legacy xtables lock needs it and lists chains);
// writing goes through iptables-restore, because go-iptables has no
// transactional call.
//
// Both exec child processes. A child inherits the network namespace of the
// OS thread that forks it, so callers that want another namespace run
// NewExecBackend and every method inside InNetNS (see netns.go).
type ExecBackend struct {
	family      Family
	ipt         *iptables.IPTables
	restorePath string
}

// NewExecBackend finds iptables (or ip6tables) and its restore companion.
func NewExecBackend(f Family) (*ExecBackend, error) {
	proto := iptables.ProtocolIPv4
	if f == IPv6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("redirect: %s: %w", f.Command(), err)
	}
	restore, err := exec.LookPath(f.Command() + "-restore")
	if err != nil {
		return nil, fmt.Errorf("redirect: %w", err)
	}
	return &ExecBackend{family: f, ipt: ipt, restorePath: restore}, nil
}

// List implements Backend.
func (b *ExecBackend) List(ctx context.Context) ([]string, error) {
	chains, err := b.ipt.ListChains(Table)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, c := range chains {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		lines, err := b.ipt.List(Table, c)
		if err != nil {
			return nil, err
		}
		out = append(out, lines...)
	}
	return out, nil
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
