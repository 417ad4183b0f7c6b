// Command ferry is a transparent TCP proxy sidecar for the Consul service
// mesh. main only turns run's error into an exit code; everything else is
// wired in run and the per-subcommand files.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/ferrymesh/ferry/cni"
)

func main() {
	if b := filepath.Base(os.Args[0]); b == cni.PluginType || b == cni.ConsulPluginType {
		// Installed as the CNI plugin: the runtime runs it by that name
		// (consul-cni's where Nomad's own network config names that type).
		os.Exit(exitCode(runCNI(os.Args[1:], os.Stdout, os.Stderr), os.Stderr))
	}
	if isDataplaneInvocation(os.Args) {
		// consul-k8s's sidecar command line (dataplane.go).
		os.Exit(exitCode(runDataplane(os.Args[1:], os.Stdout, os.Stderr), os.Stderr))
	}
	os.Exit(exitCode(run(os.Args[1:], os.Stdout, os.Stderr), os.Stderr))
}

// exitError carries an exit status other than 1 through run's error return.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageError marks bad command-line input: exit status 2, like flag.Parse.
func usageError(format string, args ...any) error {
	return &exitError{code: 2, err: fmt.Errorf(format, args...)}
}

func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil && !errors.Is(ee.err, errHelp) {
			fmt.Fprintln(stderr, "ferry:", ee.err)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "ferry:", err)
	return 1
}

var errHelp = errors.New("help requested")

const usage = `Usage: ferry <command> [flags]

Commands:
  run        run the sidecar proxy (inbound and outbound listeners)
  redirect   install the pod's traffic redirection rules (iptables)
  inject     inject ferry into Kubernetes manifests, or serve the admission webhook
  cni        the same rules as a chained CNI plugin (ferry-cni), and its installer
  version    print the version

Invoked as consul-dataplane, or with flags and no command, ferry takes
consul-dataplane's command line and DP_* environment (agentless mode).

Run "ferry <command> -h" for a command's flags.
`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{code: 2, err: errors.New("no command given")}
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		return runRun(rest, stdout, stderr)
	case "redirect":
		return runRedirect(rest, stdout, stderr)
	case "inject":
		return runInject(rest, os.Stdin, stdout, stderr)
	case "cni":
		return runCNI(rest, stdout, stderr)
	case "version", "-version", "--version":
		return runVersion(rest, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		if len(cmd) > 1 && cmd[0] == '-' {
			// `ferry -addresses ...`: the consul-dataplane command line.
			return runDataplane(args, stdout, stderr)
		}
		fmt.Fprint(stderr, usage)
		return usageError("unknown command %q", cmd)
	}
}

// notImplemented is what a subcommand returns until its issue lands:
// exit status 2, never a pretence of working.
func notImplemented(name string) error {
	return &exitError{code: 2, err: fmt.Errorf("%s: not implemented", name)}
}
