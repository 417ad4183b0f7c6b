package redirect

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// scratchNetNS creates a throw-away network namespace held by a parked OS
// thread and returns its path and the ID of the namespace the process was
// in; the namespace disappears with the thread at cleanup. Root only.
func scratchNetNS(t *testing.T) (path, origID string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		t.Skip("iptables-restore not installed")
	}
	ready := make(chan string, 1)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		orig, err := os.Readlink("/proc/thread-self/ns/net")
		if err != nil {
			ready <- "error: " + err.Error()
			return
		}
		ready <- orig
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- "error: " + err.Error()
			return
		}
		ready <- fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		<-done
	}()
	origID = <-ready
	path = <-ready
	for _, s := range []string{origID, path} {
		if strings.HasPrefix(s, "error: ") {
			t.Fatal(s)
		}
	}
	t.Cleanup(func() { close(done) })
	return path, origID
}

func nsID(t *testing.T, path string) string {
	t.Helper()
	id, err := os.Readlink(path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestExecInheritsNetNS checks the premise InNetNS relies on: a process
// exec'd from the locked thread runs in the thread's namespace, so the
// iptables binaries that ExecBackend starts need no nsenter.
func TestExecInheritsNetNS(t *testing.T) {
	path, orig := scratchNetNS(t)
	want := nsID(t, path)
	if want == orig {
		t.Fatal("scratch namespace equals the test's namespace")
	}
	for i := 0; i < 20; i++ { // many forks: any thread mix-up would show
		var got string
		err := InNetNS(path, func() error {
			out, err := exec.Command("readlink", "/proc/self/ns/net").Output()
			got = strings.TrimSpace(string(out))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("child ran in %s, want %s", got, want)
		}
	}
	// Sockets and children of other goroutines stay where they were.
	out, err := exec.Command("readlink", "/proc/self/ns/net").Output()
	if err != nil || strings.TrimSpace(string(out)) != orig {
		t.Fatalf("a child exec'd outside InNetNS ran in %s (%v), want %s", out, err, orig)
	}
}

func TestExecBackendRealKernel(t *testing.T) {
	path, orig := scratchNetNS(t)
	ctx := context.Background()
	planA := mustPlans(t, referenceConfig())
	cb := baseConfig()
	cb.ExcludeOutboundCIDRs = items("t", "198.18.0.0/15")
	planB := mustPlans(t, cb)
	err := InNetNS(path, func() error {
		// Never touch the host's table, even if InNetNS were broken.
		if id, err := os.Readlink("/proc/thread-self/ns/net"); err != nil || id == orig {
			return fmt.Errorf("not in the scratch namespace (%s, %v)", id, err)
		}
		// Foreign rules, before and after which ferry's must coexist.
		for _, args := range [][]string{
			{"-N", "USER_CHAIN"}, {"-A", "USER_CHAIN", "-p", "udp", "-j", "RETURN"},
			{"-A", "OUTPUT", "-p", "udp", "-j", "USER_CHAIN"},
			{"-A", "PREROUTING", "-p", "icmp", "-m", "comment", "--comment", "keep -j CONSUL_PROXY_INBOUND", "-j", "ACCEPT"},
		} {
			if out, err := exec.Command("iptables", append([]string{"-t", "nat"}, args...)...).CombinedOutput(); err != nil {
				return fmt.Errorf("seed %v: %v %s", args, err, out)
			}
		}
		be, err := NewExecBackend(IPv4)
		if err != nil {
			return err
		}
		bes := map[Family]Backend{IPv4: be}
		list := func() (State, string, error) {
			lines, err := be.List(ctx)
			if err != nil {
				return State{}, "", err
			}
			st, err := ParseState(lines)
			return st, strings.Join(lines, "\n"), err
		}
		_, foreign, err := list()
		if err != nil {
			return err
		}
		check := func(p Plan) error {
			st, dump, err := list()
			if err != nil {
				return err
			}
			for c, want := range p.Rules() {
				got := st.Rules[c]
				if !IsOwnedChain(c) {
					got = st.ownedJumps(true)[c]
				}
				if !slices.Equal(got, want) {
					return fmt.Errorf("kernel chain %s:\n%q\nwant\n%q", c, got, want)
				}
			}
			for _, keep := range []string{"-A USER_CHAIN -p udp -j RETURN", "-A OUTPUT -p udp -j USER_CHAIN", "keep -j CONSUL_PROXY_INBOUND"} {
				if !strings.Contains(dump, keep) {
					return fmt.Errorf("foreign rule %q lost:\n%s", keep, dump)
				}
			}
			return nil
		}

		if res, err := Apply(ctx, planA, bes); err != nil || !res[0].Changed {
			return fmt.Errorf("first apply: %v %v", res, err)
		}
		if err := check(planA[0]); err != nil {
			return err
		}
		if res, err := Apply(ctx, planA, bes); err != nil || res[0].Changed {
			return fmt.Errorf("second apply must be a no-op (kernel canonical form differs?): %v %v", res, err)
		}
		if res, err := Apply(ctx, planB, bes); err != nil || !res[0].Changed {
			return fmt.Errorf("replacing apply: %v %v", res, err)
		}
		if err := check(planB[0]); err != nil {
			return fmt.Errorf("after replacement: %w", err)
		}
		if res, err := Apply(ctx, planB, bes); err != nil || res[0].Changed {
			return fmt.Errorf("apply after replacement must be a no-op: %v %v", res, err)
		}
		if res, err := Cleanup(ctx, bes); err != nil || !res[0].Changed {
			return fmt.Errorf("cleanup: %v %v", res, err)
		}
		if _, after, err := list(); err != nil || after != foreign {
			return fmt.Errorf("after cleanup (%v):\n%s\nwant\n%s", err, after, foreign)
		}
		if res, err := Cleanup(ctx, bes); err != nil || res[0].Changed {
			return fmt.Errorf("second cleanup: %v %v", res, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentRunsRealKernel races several applies, then several
// cleanups, in one namespace: every run must succeed and the table must end
// up holding the plan once (no duplicate jumps), then nothing.
func TestConcurrentRunsRealKernel(t *testing.T) {
	path, orig := scratchNetNS(t)
	ctx := context.Background()
	plans := mustPlans(t, baseConfig())
	race := func(op func(Backend) error) {
		t.Helper()
		const n = 4
		errc := make(chan error, n)
		for range n {
			go func() {
				errc <- InNetNS(path, func() error {
					if id, err := os.Readlink("/proc/thread-self/ns/net"); err != nil || id == orig {
						return fmt.Errorf("not in the scratch namespace (%s, %v)", id, err)
					}
					be, err := NewExecBackend(IPv4)
					if err != nil {
						return err
					}
					return op(be)
				})
			}()
		}
		for range n {
			if err := <-errc; err != nil {
				t.Error(err)
			}
		}
	}
	state := func() State {
		t.Helper()
		var st State
		err := InNetNS(path, func() error {
			be, err := NewExecBackend(IPv4)
			if err != nil {
				return err
			}
			lines, err := be.List(ctx)
			if err != nil {
				return err
			}
			st, err = ParseState(lines)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	for round := range 3 {
		race(func(be Backend) error {
			_, err := Apply(ctx, plans, map[Family]Backend{IPv4: be})
			return err
		})
		if st := state(); !upToDate(st, plans[0]) {
			t.Fatalf("round %d: table is not the plan after concurrent applies: %v", round, st.Rules)
		}
		race(func(be Backend) error {
			_, err := Cleanup(ctx, map[Family]Backend{IPv4: be})
			return err
		})
		if st := state(); len(st.ownedJumps(false)) != 0 || st.HasChain(ChainOutput) {
			t.Fatalf("round %d: left after concurrent cleanups: %v", round, st.Rules)
		}
	}
}

// TestIPv6EnabledKernel: IPv6 counts as on when any interface other than
// loopback may carry it, whatever its addresses' scope; both the interface
// list and /proc/sys/net are read in the namespace of the calling thread.
func TestIPv6EnabledKernel(t *testing.T) {
	path, _ := scratchNetNS(t)
	if _, err := os.Stat("/proc/sys/net/ipv6"); err != nil {
		t.Skip("kernel without IPv6")
	}
	check := func(step string, want bool, wantWhy string) {
		t.Helper()
		var got bool
		var why string
		err := InNetNS(path, func() error {
			var err error
			got, why, err = IPv6Enabled()
			return err
		})
		if err != nil || got != want || !strings.Contains(why, wantWhy) {
			t.Fatalf("%s: IPv6Enabled = %v %q %v, want %v %q", step, got, why, err, want, wantWhy)
		}
	}
	inNS := func(f func() error) {
		t.Helper()
		if err := InNetNS(path, f); err != nil {
			t.Fatal(err)
		}
	}
	check("loopback only", false, "")
	// A veth pair (dummy interfaces need a module not every kernel has).
	setIPv6 := func(v string) func() error {
		return func() error {
			for _, ifc := range []string{"v0", "v1"} {
				if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+ifc+"/disable_ipv6", []byte(v), 0o644); err != nil {
					return err
				}
			}
			return nil
		}
	}
	inNS(func() error {
		return exec.Command("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1").Run()
	})
	check("interfaces down, IPv6 not disabled", true, "IPv6 is enabled on v")
	inNS(setIPv6("1"))
	check("IPv6 disabled on the interfaces", false, "")
	inNS(setIPv6("0"))
	inNS(func() error {
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/v1/disable_ipv6", []byte("1"), 0o644); err != nil {
			return err
		}
		return exec.Command("ip", "addr", "add", "fe80::1/64", "dev", "v0", "nodad").Run()
	})
	check("link-local address", true, "v0 has IPv6 address fe80::1")
}
