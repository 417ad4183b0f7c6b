package cni

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/ns"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/ferrymesh/ferry/redirect"
)

// Rules installs, checks and removes the redirection rules in a network
// namespace. NetNSRules is the real one; tests of the protocol logic use a
// fake.
type Rules interface {
	Apply(ctx context.Context, netns string, spec redirect.Spec) ([]redirect.Result, error)
	Check(ctx context.Context, netns string, spec redirect.Spec) error
	Cleanup(ctx context.Context, netns string) ([]redirect.Result, error)
}

// NetNSRules does what `ferry redirect -netns` does: it enters the
// namespace on a locked thread and drives iptables there (redirect.InNetNS).
type NetNSRules struct{}

// families is `ferry redirect`'s choice: IPv4, plus IPv6 when the
// namespace has a global IPv6 address (the pod's network plugin has run
// by now, so its addresses are in place). Call inside InNetNS.
func families() ([]redirect.Family, error) {
	fs := []redirect.Family{redirect.IPv4}
	v6, err := redirect.HasGlobalIPv6()
	if err != nil {
		return nil, err
	}
	if v6 {
		fs = append(fs, redirect.IPv6)
	}
	return fs, nil
}

func backendsFor(fs []redirect.Family) (map[redirect.Family]redirect.Backend, error) {
	bes := map[redirect.Family]redirect.Backend{}
	for _, f := range fs {
		be, err := redirect.NewExecBackend(f)
		if err != nil {
			return nil, err
		}
		bes[f] = be
	}
	return bes, nil
}

// planIn builds the plans for the namespace's families. A Build error is
// the config's fault (a DNS IP of a family the pod lacks).
func planIn(spec redirect.Spec) ([]redirect.Plan, map[redirect.Family]redirect.Backend, error) {
	fs, err := families()
	if err != nil {
		return nil, nil, err
	}
	plans, err := redirect.Build(spec, fs...)
	if err != nil {
		return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, "ferry-cni: invalid redirect config", err.Error())
	}
	bes, err := backendsFor(fs)
	if err != nil {
		return nil, nil, err
	}
	return plans, bes, nil
}

// Apply implements Rules.
func (NetNSRules) Apply(ctx context.Context, netns string, spec redirect.Spec) (res []redirect.Result, err error) {
	err = redirect.InNetNS(netns, func() error {
		plans, bes, err := planIn(spec)
		if err != nil {
			return err
		}
		res, err = redirect.Apply(ctx, plans, bes)
		return err
	})
	return res, err
}

// Check implements Rules.
func (NetNSRules) Check(ctx context.Context, netns string, spec redirect.Spec) error {
	return redirect.InNetNS(netns, func() error {
		plans, bes, err := planIn(spec)
		if err != nil {
			return err
		}
		return redirect.Check(ctx, plans, bes)
	})
}

// Cleanup implements Rules. IPv6 is cleaned when ip6tables can list the
// namespace's nat table; a node without ip6tables has no IPv6 rules of ours.
func (NetNSRules) Cleanup(ctx context.Context, netns string) (res []redirect.Result, err error) {
	err = redirect.InNetNS(netns, func() error {
		bes, err := backendsFor([]redirect.Family{redirect.IPv4})
		if err != nil {
			return err
		}
		if be6, err := redirect.NewExecBackend(redirect.IPv6); err == nil {
			if _, err := be6.List(ctx); err == nil {
				bes[redirect.IPv6] = be6
			}
		}
		res, err = redirect.Cleanup(ctx, bes)
		return err
	})
	return res, err
}

// errNoNetNS marks a CNI_NETNS that does not (or no longer) name a
// network namespace.
var errNoNetNS = errors.New("not a network namespace")

// checkNetNS makes sure path is a network namespace other than the
// plugin's own: rules meant for a pod must never land on the node. (skel
// makes the same comparison, but only after ADD has run.)
func checkNetNS(path string) error {
	if path == "" {
		return fmt.Errorf("CNI_NETNS is empty: %w", errNoNetNS)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w (%v)", path, errNoNetNS, err)
	}
	defer f.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("%s: %w (%v)", path, errNoNetNS, err)
	}
	// Both a netns bind mount and /proc/<pid>/ns/net open as nsfs files;
	// once `ip netns del` unmounts it, the path is gone or a plain file.
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%s: %w (file system type %#x)", path, errNoNetNS, st.Type)
	}
	same, terr := ns.CheckNetNS(path)
	if terr != nil {
		return terr
	}
	if same {
		return fmt.Errorf("%s is the plugin's own (the node's) network namespace; refusing to touch it", path)
	}
	return nil
}
