package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

// Agent is a `consul agent -dev` on the host side of the testbed bridge. Its
// HTTP, DNS and gRPC listeners are bound to the bridge address (for pods) and
// 127.0.0.1 (for the test process).
type Agent struct {
	// HTTPAddr, DNSAddr and GRPCAddr are host:port on the bridge address.
	HTTPAddr, DNSAddr, GRPCAddr string
	// Client talks to HTTPAddr.
	Client *api.Client

	path    string
	id      string
	node    string
	gateway netip.Addr
	ports   agentPorts
	logf    func(string, ...any)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncBuffer
}

type agentPorts struct{ http, dns, grpc, grpcTLS, serfLAN, serfWAN, server int }

func startAgent(path, id string, gateway netip.Addr, logf func(string, ...any)) (*Agent, error) {
	ps, err := freePorts(7)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		path:    path,
		id:      id,
		node:    "ferry-" + id,
		gateway: gateway,
		ports:   agentPorts{ps[0], ps[1], ps[2], ps[3], ps[4], ps[5], ps[6]},
		logf:    logf,
		log:     &syncBuffer{},
	}
	a.HTTPAddr = net.JoinHostPort(gateway.String(), strconv.Itoa(a.ports.http))
	a.DNSAddr = net.JoinHostPort(gateway.String(), strconv.Itoa(a.ports.dns))
	a.GRPCAddr = net.JoinHostPort(gateway.String(), strconv.Itoa(a.ports.grpc))
	cfg := api.DefaultConfig()
	cfg.Address = a.HTTPAddr
	if a.Client, err = api.NewClient(cfg); err != nil {
		return nil, err
	}
	if err := a.Start(); err != nil {
		a.Stop()
		return nil, err
	}
	return a, nil
}

// Start (re)starts the agent on the same ports and waits until it has a
// leader and the Connect CA answers. A dev agent keeps its state in memory:
// after Stop and Start the catalog, config entries and CA are new.
func (a *Agent) Start() error {
	a.mu.Lock()
	if a.cmd != nil {
		a.mu.Unlock()
		return nil
	}
	p := a.ports
	cmd, err := Command(a.path, "agent", "-dev",
		"-node", a.node,
		"-bind", "127.0.0.1",
		"-client", "127.0.0.1 "+a.gateway.String(),
		"-http-port", strconv.Itoa(p.http),
		"-dns-port", strconv.Itoa(p.dns),
		"-grpc-port", strconv.Itoa(p.grpc),
		"-grpc-tls-port", strconv.Itoa(p.grpcTLS),
		"-serf-lan-port", strconv.Itoa(p.serfLAN),
		"-serf-wan-port", strconv.Itoa(p.serfWAN),
		"-server-port", strconv.Itoa(p.server),
		"-log-level", "info",
	)
	if err != nil {
		a.mu.Unlock()
		return err
	}
	cmd.Stdout = a.log
	cmd.Stderr = a.log
	// No Pdeathsig (see Pod.command); the agent's pid goes into the
	// testbed's marker so the sweep can kill it if the test process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		a.mu.Unlock()
		return fmt.Errorf("testbed: start consul: %w", err)
	}
	addMarkerPID(a.id, cmd.Process.Pid)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	a.cmd, a.done = cmd, done
	a.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := a.waitReady(ctx, done); err != nil {
		return fmt.Errorf("testbed: consul agent not ready: %w\n%s", err, tail(a.log.String(), 40))
	}
	return nil
}

// waitReady polls until the agent has a leader and serves CA roots with an
// active root: the earliest moment leaves can be issued.
func (a *Agent) waitReady(ctx context.Context, exited <-chan struct{}) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		select {
		case <-exited:
			return errors.New("agent exited")
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		case <-tick.C:
		}
		leader, err := a.Client.Status().Leader()
		if err != nil || leader == "" {
			last = fmt.Errorf("leader %q: %v", leader, err)
			continue
		}
		roots, _, err := a.Client.Agent().ConnectCARoots(nil)
		if err != nil || roots == nil || roots.ActiveRootID == "" {
			last = fmt.Errorf("ca roots: %v", err)
			continue
		}
		return nil
	}
}

// Stop kills the agent and waits for it to exit. It is idempotent.
func (a *Agent) Stop() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// Pause freezes the agent (SIGSTOP): its sockets stay open but nothing
// answers, as with a hung or partitioned agent. Resume undoes it. Unlike
// Stop/Start, the agent keeps its state.
//
// It returns once every thread of the agent has stopped: SIGSTOP reaches a
// busy multi-threaded process asynchronously, and a thread still running
// could answer one more request (seen on a loaded machine). Gives up after
// 5 s (the next request then tells).
func (a *Agent) Pause() {
	a.signal(syscall.SIGSTOP)
	a.mu.Lock()
	var pid int
	if a.cmd != nil {
		pid = a.cmd.Process.Pid
	}
	a.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); pid != 0 && time.Now().Before(deadline); {
		if allStopped(pid) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// allStopped reports whether every thread of pid is in the stopped state
// (T in /proc/<pid>/task/<tid>/stat).
func allStopped(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, t.Name()))
		if err != nil {
			return false
		}
		// The state follows the command name, which is in parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

// Resume continues a paused agent.
func (a *Agent) Resume() { a.signal(syscall.SIGCONT) }

func (a *Agent) signal(sig syscall.Signal) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		syscall.Kill(a.cmd.Process.Pid, sig)
	}
}

// Log returns what the agent has printed so far, across restarts.
func (a *Agent) Log() string { return a.log.String() }

// Env is the environment that points Consul clients (ferry, consul CLI) in
// a pod at this agent.
func (a *Agent) Env() []string {
	return []string{"CONSUL_HTTP_ADDR=http://" + a.HTTPAddr, "CONSUL_GRPC_ADDR=" + a.GRPCAddr}
}

// freePorts asks the kernel for n distinct free TCP ports that are also free
// for UDP (the DNS port needs both).
func freePorts(n int) ([]int, error) {
	var ports []int
	var closers []func()
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	for len(ports) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		closers = append(closers, func() { l.Close() })
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		closers = append(closers, func() { u.Close() })
		ports = append(ports, port)
	}
	return ports, nil
}
