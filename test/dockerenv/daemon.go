// Package dockerenv runs the compose example for the e2e test and the
// Makefile: a Docker Engine of ferry's own (Debian's docker.io package, its
// own data root, socket and address range), the base images the Dockerfile
// names made locally when the machine cannot pull them, the example's images,
// and Docker Compose v2 built from the tools module in test/tools/compose.
//
// Nothing here ever pulls from an image registry.
package dockerenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"golang.org/x/sys/unix"
)

// The engine's fixed places. The socket and exec root are outside the data
// root (which lives under .cache and survives runs) because they are
// per-boot state.
const (
	Socket    = "/run/ferry-docker.sock"
	Host      = "unix://" + Socket
	runDir    = "/run/ferry-docker"
	pidFile   = runDir + "/dockerd.pid"
	execRoot  = runDir + "/exec"
	lockFile  = runDir + "/lock"
	ownerFile = runDir + "/owner"
	// AddressPool is where the engine takes networks from: inside
	// 198.18.0.0/15 (benchmarking space, RFC 2544), never a private range a
	// developer's own networks may use. The example's network is a fixed
	// /24 in the other half, 198.19.0.0/16, so the two never collide.
	AddressPool = "198.18.0.0/16"
)

// Docker is a client of ferry's engine: the docker CLI of Debian's docker.io
// package (the engine's own version) pointed at Socket.
type Docker struct {
	CLI  string // path of the docker client
	Root string // the repository
	// started is true when Start launched the engine, so Stop ends it.
	started bool
	pid     int
}

// Client returns the docker CLI the tests use: Debian's /usr/bin/docker,
// which matches the engine, rather than whatever docker comes first in PATH.
func Client() (string, error) {
	for _, p := range []string{"/usr/bin/docker", "/bin/docker"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("dockerenv: /usr/bin/docker not found: install Debian's docker.io package (test/scripts/deps.sh does)")
}

// Env is the environment for docker and compose commands against the engine.
func (d *Docker) Env() []string {
	env := []string{"DOCKER_HOST=" + Host, "DOCKER_BUILDKIT=0", "COMPOSE_DOCKER_CLI_BUILD=0"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DOCKER_") && !strings.HasPrefix(kv, "COMPOSE_") {
			env = append(env, kv)
		}
	}
	return env
}

// Start connects to ferry's engine, starting dockerd when none answers on
// Socket. logf gets progress lines.
func Start(ctx context.Context, root string, logf func(string, ...any)) (*Docker, error) {
	cli, err := Client()
	if err != nil {
		return nil, err
	}
	dockerd, err := testbed.LookPath("dockerd")
	if err != nil {
		return nil, errors.New("dockerenv: dockerd not found: install Debian's docker.io package (test/scripts/deps.sh does)")
	}
	d := &Docker{CLI: cli, Root: root}
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("dockerenv: lock: %w", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if d.ping(ctx) == nil {
		logf("dockerenv: using the running engine on %s", Socket)
		return d, nil
	}
	dataRoot := filepath.Join(MachineCache(), "docker", "data")
	if err := os.MkdirAll(dataRoot, 0o711); err != nil {
		return nil, err
	}
	logPath := filepath.Join(root, ".cache", "docker", "dockerd.log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	// --bridge=none: no default docker0 bridge (nothing left on the host
	// after Stop); --iptables=false and --ip-forward=false: the engine
	// touches neither the host's firewall nor its sysctls, so the e2e
	// testbeds running beside it keep their forwarding. Builds use the host
	// network; the example's containers talk on one user-defined bridge,
	// which needs neither. Published ports go through docker-proxy.
	cmd := command(context.Background(), dockerd,
		"--data-root", dataRoot,
		"--exec-root", execRoot,
		"--pidfile", pidFile,
		"-H", Host,
		"--bridge", "none",
		"--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
		"--default-address-pool", "base="+AddressPool+",size=24",
		"--storage-driver", "overlay2",
		"--log-level", "warn",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group: a Ctrl-C of `make compose-up` must not take
	// the engine down with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	begin := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("dockerenv: start dockerd: %w", err)
	}
	d.started, d.pid = true, cmd.Process.Pid
	go cmd.Wait() // reap; Stop waits on the pid itself
	os.WriteFile(ownerFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
	deadline := time.Now().Add(60 * time.Second)
	for d.ping(ctx) != nil {
		if time.Now().After(deadline) || unix.Kill(d.pid, 0) != nil {
			d.Stop()
			return nil, fmt.Errorf("dockerenv: dockerd did not come up (log: %s)", logPath)
		}
		time.Sleep(200 * time.Millisecond)
	}
	logf("dockerenv: started dockerd (pid %d) on %s in %v, data root %s", d.pid, Socket, time.Since(begin).Round(time.Millisecond), dataRoot)
	return d, nil
}

// Started says whether Start launched the engine (and Stop will end it).
func (d *Docker) Started() bool { return d.started }

// Stop ends the engine if Start launched it; an engine found running is left
// alone. dockerd stops its containerd and unmounts its layers on SIGTERM.
func (d *Docker) Stop() error {
	if !d.started {
		return nil
	}
	d.started = false
	return StopPID(d.pid)
}

// StopPID sends dockerd SIGTERM and waits up to 30 s, then SIGKILL.
func StopPID(pid int) error {
	if err := unix.Kill(pid, unix.SIGTERM); err != nil {
		return nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if unix.Kill(pid, 0) != nil {
			os.Remove(ownerFile)
			// dockerd leaves the bind mount of its default namespace.
			unix.Unmount(filepath.Join(execRoot, "netns", "default"), unix.MNT_DETACH)
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	unix.Kill(pid, unix.SIGKILL)
	return fmt.Errorf("dockerenv: dockerd (pid %d) did not stop within 30 s; killed", pid)
}

// RunningPID returns the pid of ferry's engine from its pidfile, 0 if none.
func RunningPID() int {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || unix.Kill(pid, 0) != nil {
		return 0
	}
	return pid
}

func (d *Docker) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := d.Output(ctx, "version", "--format", "{{.Server.Version}}")
	return err
}

// Output runs the docker CLI and returns its stdout; the error carries
// stderr.
func (d *Docker) Output(ctx context.Context, args ...string) (string, error) {
	cmd := command(ctx, d.CLI, args...)
	cmd.Env = d.Env()
	cmd.Dir = d.Root
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// Run runs the docker CLI with combined output, returned on error.
func (d *Docker) Run(ctx context.Context, args ...string) error {
	cmd := command(ctx, d.CLI, args...)
	cmd.Env = d.Env()
	cmd.Dir = d.Root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("docker %s: %w\n%s", strings.Join(args, " "), err, tailLines(string(out), 30))
	}
	return nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
