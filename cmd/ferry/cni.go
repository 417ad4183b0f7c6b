package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/cni"
)

const cniUsage = `Usage: ferry-cni                  (run by the container runtime as a CNI plugin)
       ferry-cni install [flags]  (or: ferry cni install)
       ferry-cni uninstall [flags]

As a plugin (CNI_COMMAND set), ferry-cni runs chained after the pod's network
plugin and installs the same redirection rules as "ferry redirect" in the
pod's namespace, from CONSUL_IPTABLES_CONFIG in CNI_ARGS (Nomad) or the pod's
consul.hashicorp.com/redirect-traffic-config annotation (consul-k8s). The
binary is ferry itself, installed as ferry-cni; see docs/redirect.md.

install copies the binary to the CNI bin dir, appends ferry-cni to the first
network config in the CNI config dir (a .conf becomes a .conflist) and writes
the plugin's kubeconfig; uninstall puts everything back.
`

// runCNI is ferry-cni: the plugin when the runtime runs it (no
// arguments), the installer with install/uninstall.
func runCNI(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "install":
			return runCNIInstall(args[1:], stdout, stderr)
		case "uninstall":
			return runCNIUninstall(args[1:], stdout, stderr)
		case "-h", "-help", "--help", "help":
			fmt.Fprint(stdout, cniUsage)
			return nil
		default:
			fmt.Fprint(stderr, cniUsage)
			return usageError("cni: unknown argument %q", args[0])
		}
	}
	if e := cni.New(stdout, stderr).Main(); e != nil {
		// The CNI error result goes to stdout, where the runtime reads it.
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "    ")
		if err := enc.Encode(e); err != nil {
			return fmt.Errorf("cni: write error result: %w", err)
		}
		return &exitError{code: 1}
	}
	return nil
}

// Where a pod's service account lands; the DaemonSet's is the plugin's.
const (
	saDir = "/var/run/secrets/kubernetes.io/serviceaccount"
)

type cniInstallFlags struct {
	binDir, netDir, logLevel string
	server, caFile, token    string
	daemon                   bool
	interval                 time.Duration
}

func (f *cniInstallFlags) register(fs *flag.FlagSet, install bool) {
	fs.StringVar(&f.binDir, "cni-bin-dir", cni.DefaultBinDir, "CNI plugin binary `dir`")
	fs.StringVar(&f.netDir, "cni-net-dir", cni.DefaultNetDir, "CNI network config `dir`")
	if !install {
		return
	}
	server := ""
	if h, p := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"); h != "" && p != "" {
		server = "https://" + net.JoinHostPort(h, p)
	}
	fs.StringVar(&f.server, "api-server", server, "Kubernetes API server `URL` for the plugin's kubeconfig (default: in-cluster; empty: no kubeconfig, e.g. Nomad)")
	fs.StringVar(&f.caFile, "ca-file", filepath.Join(saDir, "ca.crt"), "API server CA `file`, embedded in the kubeconfig")
	fs.StringVar(&f.token, "token-file", filepath.Join(saDir, "token"), "service account token `file`, copied next to the kubeconfig (and re-copied when it rotates, with -daemon)")
	fs.StringVar(&f.logLevel, "log-level", "", "plugin log level (trace, debug, info, warn, error)")
	fs.BoolVar(&f.daemon, "daemon", false, "stay running: repair the install every -interval, uninstall on SIGTERM (the DaemonSet mode)")
	fs.DurationVar(&f.interval, "interval", 10*time.Second, "with -daemon: how often to re-check the install")
}

func parseCNIFlags(name string, args []string, install bool, stderr io.Writer) (*cniInstallFlags, error) {
	var f cniInstallFlags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, cniUsage+"\nFlags:\n")
		fs.PrintDefaults()
	}
	f.register(fs, install)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, &exitError{code: 0, err: errHelp}
		}
		return nil, &exitError{code: 2, err: err}
	}
	if fs.NArg() > 0 {
		return nil, usageError("cni %s: unexpected arguments %q", name, fs.Args())
	}
	return &f, nil
}

func runCNIInstall(args []string, stdout, stderr io.Writer) error {
	f, err := parseCNIFlags("install", args, true, stderr)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("cni install: find own binary: %w", err)
	}
	cfg := cni.InstallConfig{
		BinDir: f.binDir, NetDir: f.netDir, Binary: self,
		Server: f.server, LogLevel: f.logLevel,
	}
	if f.server != "" {
		cfg.CAFile, cfg.TokenFile = f.caFile, f.token
	}
	res, err := cni.Install(cfg)
	if err != nil {
		return err
	}
	if res.Changed {
		fmt.Fprintf(stdout, "ferry-cni installed in %s\n", res.ConfFile)
	} else {
		fmt.Fprintf(stdout, "ferry-cni already installed in %s; nothing changed\n", res.ConfFile)
	}
	if !f.daemon {
		return nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tick := time.NewTicker(f.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := cni.Uninstall(f.binDir, f.netDir); err != nil {
				return err
			}
			fmt.Fprintln(stdout, "ferry-cni uninstalled")
			return nil
		case <-tick.C:
			// Another CNI may have rewritten its config, or the token
			// rotated: Install repairs whatever drifted.
			res, err := cni.Install(cfg)
			if err != nil {
				fmt.Fprintln(stderr, "ferry-cni: repair:", err)
			} else if res.Changed {
				fmt.Fprintf(stdout, "ferry-cni repaired in %s\n", res.ConfFile)
			}
		}
	}
}

func runCNIUninstall(args []string, stdout, stderr io.Writer) error {
	f, err := parseCNIFlags("uninstall", args, false, stderr)
	if err != nil {
		return err
	}
	if err := cni.Uninstall(f.binDir, f.netDir); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "ferry-cni uninstalled")
	return nil
}
