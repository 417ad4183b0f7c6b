package testbed

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Proc says how to run a process in a pod.
type Proc struct {
	// UID (and GID) to run as; 0 runs as root. The proxy runs as 5995.
	UID int
	// Env is added to the pod's environment (which points at the agent).
	Env []string
	// Name labels the process in failure logs; default: argv[0].
	Name string
}

// Process is a long-running command in a pod.
type Process struct {
	Name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// Start runs argv in the pod in the background. At cleanup it is stopped
// (SIGTERM, then SIGKILL) and, if the test failed, its output is logged.
func (p *Pod) Start(t testing.TB, o Proc, argv ...string) *Process {
	t.Helper()
	pr, err := p.StartProcess(o, argv...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pr.Stop()
		if t.Failed() {
			t.Logf("%s in pod %s (output tail):\n%s", pr.Name, p.Name, tail(pr.Output(), 40))
		}
	})
	return pr
}

// StartProcess is Start for callers without a testing.TB; they must Stop it
// (the pod's teardown also kills everything left in its namespace).
func (p *Pod) StartProcess(o Proc, argv ...string) (*Process, error) {
	cmd, err := p.command(o, argv...)
	if err != nil {
		return nil, err
	}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	name := o.Name
	if name == "" {
		name = argv[0]
	}
	pr := &Process{Name: name, cmd: cmd, out: out, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("testbed: start %s in %s: %w", name, p.Name, err)
	}
	go func() {
		pr.err = cmd.Wait()
		close(pr.done)
	}()
	return pr, nil
}

// Exec runs argv in the pod to completion and returns its combined output.
func (p *Pod) Exec(t testing.TB, o Proc, argv ...string) (string, error) {
	t.Helper()
	cmd, err := p.command(o, argv...)
	if err != nil {
		// An unlisted or missing program is the test's setup failing, not
		// a result the caller should interpret.
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	return out.String(), err
}

// ExecOK is Exec that fails the test on error.
func (p *Pod) ExecOK(t testing.TB, o Proc, argv ...string) string {
	t.Helper()
	out, err := p.Exec(t, o, argv...)
	if err != nil {
		t.Fatalf("pod %s: %s: %v\n%s", p.Name, strings.Join(argv, " "), err, out)
	}
	return out
}

// command builds `ip netns exec NS [setpriv ...] argv`; ip netns exec also
// bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf. Every
// program in it must be in the programs list (LookPath).
func (p *Pod) command(o Proc, argv ...string) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("testbed: pod %s: no command", p.Name)
	}
	args := []string{"netns", "exec", p.NS}
	if o.UID != 0 {
		if _, err := LookPath("setpriv"); err != nil {
			return nil, err
		}
		id := strconv.Itoa(o.UID)
		args = append(args, "setpriv", "--reuid", id, "--regid", id, "--clear-groups", "--")
	}
	// Checked here, run by name as before: ip netns exec finds it on PATH.
	if _, err := LookPath(argv[0]); err != nil {
		return nil, err
	}
	args = append(args, argv...)
	cmd, err := Command("ip", args...)
	if err != nil {
		return nil, err
	}
	cmd.Env = append(append(os.Environ(), p.env...), o.Env...)
	// No Pdeathsig: it fires when the OS *thread* that forked exits, and
	// code that enters a namespace on a locked thread ends that thread, so
	// it would kill pod processes at random. A dead test process's pods are
	// reaped by the sweep instead (every process in the pod's netns).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}

// Output returns what the process printed so far.
func (pr *Process) Output() string { return pr.out.String() }

// WaitOutput waits until the output contains s, the process exits, or d passes.
func (pr *Process) WaitOutput(s string, d time.Duration) error {
	deadline := time.After(d)
	for {
		ch := pr.out.changed()
		if strings.Contains(pr.out.String(), s) {
			return nil
		}
		select {
		case <-ch:
		case <-pr.done:
			if strings.Contains(pr.out.String(), s) {
				return nil
			}
			return fmt.Errorf("%s exited (%v) before printing %q:\n%s", pr.Name, pr.err, s, tail(pr.Output(), 30))
		case <-deadline:
			return fmt.Errorf("%s did not print %q within %v:\n%s", pr.Name, s, d, tail(pr.Output(), 30))
		}
	}
}

// Signal sends sig to the process.
func (pr *Process) Signal(sig os.Signal) error { return pr.cmd.Process.Signal(sig) }

// PID is the process id (of the command itself: ip netns exec and setpriv exec).
func (pr *Process) PID() int { return pr.cmd.Process.Pid }

// Done is closed when the process has exited.
func (pr *Process) Done() <-chan struct{} { return pr.done }

// Wait waits up to d for the process to exit and returns its exit error.
func (pr *Process) Wait(d time.Duration) error {
	select {
	case <-pr.done:
		return pr.err
	case <-time.After(d):
		return fmt.Errorf("%s still running after %v", pr.Name, d)
	}
}

// Stop sends SIGTERM to the process group, then SIGKILL after 5 s. Idempotent.
func (pr *Process) Stop() {
	select {
	case <-pr.done:
		return
	default:
	}
	syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-pr.done:
	case <-time.After(5 * time.Second):
		syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGKILL)
		<-pr.done
	}
}

// syncBuffer is a goroutine-safe output buffer that can signal writes.
type syncBuffer struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	notify chan struct{}
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.notify != nil {
		close(b.notify)
		b.notify = nil
	}
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// changed returns a channel closed at the next Write.
func (b *syncBuffer) changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.notify == nil {
		b.notify = make(chan struct{})
	}
	return b.notify
}
