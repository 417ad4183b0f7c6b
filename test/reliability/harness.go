package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

const (
	proxyUID = 5995
	appPort  = 8080
	// The sidecar's default ports inside a pod.
	adminAddr    = "127.0.0.1:19000"
	outboundAddr = "127.0.0.1:15001"
	dnsAddr      = "127.0.0.1:8600"
	inboundPort  = 20000
)

// sidecar is one `ferry run` in a pod; it can be killed and restarted.
type sidecar struct {
	name    string
	pod     *testbed.Pod
	proxyID string
	wrap    []string // e.g. prlimit, before the ferry argv
	extra   []string
	mu      sync.Mutex
	pr      *testbed.Process
	all     []*testbed.Process // every run, for the logs
}

func (s *sidecar) proc() *testbed.Process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pr
}

// env is the testbed with one ferry mTLS pair: the client pod fcli (its app
// is the load client) dials the virtual IP of service rel-srv, whose pod
// fsrv runs the echo server behind its sidecar; the pod "outside" is not in
// the mesh (hostile clients, slowloris).
type env struct {
	tb      *testbed.Testbed
	self    string
	ferry   string
	logf    func(string, ...any)
	procs   []*testbed.Process
	fcli    *sidecar
	fsrv    *sidecar
	cliPod  *testbed.Pod
	srvPod  *testbed.Pod
	outside *testbed.Pod
	vip     string // rel-srv's virtual IP:port, what the client app dials
	echo    *testbed.Process
	sampler *sampler
	regs    []testbed.Service // re-registered after an agent restart
	// loadLogs are the churn loads' outputs (every failure, timed), saved
	// with the ferry logs.
	loadLogs []string
}

func (e *env) start(pod *testbed.Pod, o testbed.Proc, argv ...string) (*testbed.Process, error) {
	pr, err := pod.StartProcess(o, argv...)
	if err != nil {
		return nil, err
	}
	e.procs = append(e.procs, pr)
	return pr, nil
}

func (e *env) stopAll() {
	for _, s := range []*sidecar{e.fcli, e.fsrv} {
		if s != nil && s.proc() != nil {
			s.proc().Stop()
		}
	}
	for i := len(e.procs) - 1; i >= 0; i-- {
		e.procs[i].Stop()
	}
	e.procs = nil
}

func (e *env) exec(pod *testbed.Pod, o testbed.Proc, d time.Duration, argv ...string) (string, error) {
	pr, err := pod.StartProcess(o, argv...)
	if err != nil {
		return "", err
	}
	if err := pr.Wait(d); err != nil {
		pr.Stop()
		return pr.Output(), fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
	}
	return pr.Output(), nil
}

func (e *env) tunePod(pod *testbed.Pod) error {
	for _, kv := range []string{"net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=15500 60999"} {
		cmd, err := testbed.Command("ip", "netns", "exec", pod.NS, "sysctl", "-q", "-w", kv)
		if err != nil {
			return err
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("sysctl %s in %s: %w: %s", kv, pod.Name, err, out)
		}
	}
	return nil
}

// setup builds the pods, registers the services, installs the redirect
// rules and starts both sidecars and the echo server.
func (e *env) setup() error {
	var err error
	if e.srvPod, err = e.tb.NewPod("fsrv"); err != nil {
		return err
	}
	if e.cliPod, err = e.tb.NewPod("fcli"); err != nil {
		return err
	}
	if e.outside, err = e.tb.NewPod("outside"); err != nil {
		return err
	}
	for _, p := range []*testbed.Pod{e.srvPod, e.cliPod, e.outside} {
		if err := e.tunePod(p); err != nil {
			return err
		}
	}
	if err := e.startEcho(); err != nil {
		return err
	}
	e.regs = []testbed.Service{{Name: "rel-srv", Pod: e.srvPod, Port: appPort}, {Name: "rel-cli", Pod: e.cliPod, Port: 7000}}
	rs, err := e.tb.RegisterService(e.regs[0])
	if err != nil {
		return err
	}
	rc, err := e.tb.RegisterService(e.regs[1])
	if err != nil {
		return err
	}
	e.fsrv = &sidecar{name: "ferry (server side)", pod: e.srvPod, proxyID: rs.ProxyID}
	e.fcli = &sidecar{name: "ferry (client side)", pod: e.cliPod, proxyID: rc.ProxyID}
	for _, s := range []*sidecar{e.fsrv, e.fcli} {
		if out, err := e.exec(s.pod, testbed.Proc{Name: "ferry redirect"}, 30*time.Second, e.ferry, "redirect",
			"-proxy-uid", strconv.Itoa(proxyUID), "-proxy-id", s.proxyID); err != nil {
			return fmt.Errorf("ferry redirect: %v: %s", err, out)
		}
		if _, err := e.startSidecar(s); err != nil {
			return err
		}
	}
	var vip string
	for range 100 {
		if vip, err = e.tb.VirtualIP("rel-srv"); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	e.vip = net.JoinHostPort(vip, strconv.Itoa(appPort))
	return e.probe()
}

func (e *env) startEcho() error {
	pr, err := e.start(e.srvPod, testbed.Proc{Name: "echo server"}, e.self, "server", "-addr", ":"+strconv.Itoa(appPort), "-report")
	if err != nil {
		return err
	}
	e.echo = pr
	return pr.WaitOutput("ready", 10*time.Second)
}

// startSidecar starts `ferry run` and waits for /ready; it returns how long
// that took.
func (e *env) startSidecar(s *sidecar) (time.Duration, error) {
	argv := append(append(append([]string{}, s.wrap...), e.ferry, "run", "-proxy-id", s.proxyID), s.extra...)
	t0 := time.Now()
	pr, err := s.pod.StartProcess(testbed.Proc{UID: proxyUID, Name: s.name}, argv...)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.pr = pr
	s.all = append(s.all, pr)
	s.mu.Unlock()
	for deadline := time.Now().Add(30 * time.Second); ; {
		if code, _ := e.admin(s.pod, "GET", "/ready"); code == 200 {
			return time.Since(t0), nil
		}
		select {
		case <-pr.Done():
			return 0, fmt.Errorf("%s exited before ready:\n%s", s.name, lastLines(pr.Output(), 20))
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s not ready after 30s:\n%s", s.name, lastLines(pr.Output(), 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// admin sends one request to a sidecar's admin listener inside pod.
func (e *env) admin(pod *testbed.Pod, method, path string) (int, string) {
	script := fmt.Sprintf(`exec 3<>/dev/tcp/127.0.0.1/19000 && printf '%s %s HTTP/1.0\r\n\r\n' >&3 && cat <&3`, method, path)
	out, _ := e.exec(pod, testbed.Proc{}, 10*time.Second, "bash", "-c", script)
	head, body, _ := strings.Cut(out, "\r\n\r\n")
	f := strings.Fields(head)
	if len(f) < 2 {
		return 0, out
	}
	code, _ := strconv.Atoi(f[1])
	return code, body
}

// probe proves the pair carries a verified stream.
func (e *env) probe() error {
	var last error
	for range 30 {
		r, _, err := e.load(30*time.Second, "-streams", "1", "-once", "-dur", "300ms")
		if err == nil && r.OK == 1 && r.BytesVerified > 0 {
			return nil
		}
		last = fmt.Errorf("probe: %+v %v", r, err)
		if r.Truncated+r.Corrupt > 0 {
			// Not a sidecar still starting: data was lost or altered.
			return last
		}
		time.Sleep(200 * time.Millisecond)
	}
	return last
}

// load runs the load client in fcli against the virtual IP to completion
// and returns its result and ticks.
func (e *env) load(d time.Duration, args ...string) (snapshot, []snapshot, error) {
	pr, err := e.startLoad(args...)
	if err != nil {
		return snapshot{}, nil, err
	}
	if err := pr.Wait(d); err != nil {
		pr.Stop()
		return snapshot{}, nil, fmt.Errorf("load: %w: %s", err, lastLines(pr.Output(), 5))
	}
	return parseLoad(pr.Output())
}

func (e *env) startLoad(args ...string) (*testbed.Process, error) {
	argv := append([]string{e.self, "load", "-addr", e.vip}, args...)
	return e.start(e.cliPod, testbed.Proc{Name: "load"}, argv...)
}

// parseLoad reads the "tick" and the last "result" (or "opened") line.
func parseLoad(out string) (snapshot, []snapshot, error) {
	var res snapshot
	var ticks []snapshot
	found := false
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		kind, js, ok := strings.Cut(sc.Text(), " ")
		if !ok || (kind != "tick" && kind != "result" && kind != "opened") {
			continue
		}
		var s snapshot
		if json.Unmarshal([]byte(js), &s) != nil {
			continue
		}
		switch kind {
		case "tick":
			ticks = append(ticks, s)
		default:
			res, found = s, true
		}
	}
	if !found {
		return res, ticks, fmt.Errorf("load printed no result: %s", lastLines(out, 5))
	}
	return res, ticks, nil
}

// hostile runs a hostile client in pod to completion.
func (e *env) hostile(pod *testbed.Pod, kind, addr string, n int, extra ...string) (hostileResult, error) {
	argv := append([]string{e.self, "hostile", "-kind", kind, "-addr", addr, "-n", strconv.Itoa(n)}, extra...)
	out, err := e.exec(pod, testbed.Proc{Name: "hostile " + kind}, 3*time.Minute, argv...)
	var r hostileResult
	if err != nil {
		return r, fmt.Errorf("%v: %s", err, lastLines(out, 3))
	}
	for _, l := range strings.Split(out, "\n") {
		if js, ok := strings.CutPrefix(l, "result "); ok {
			err := json.Unmarshal([]byte(js), &r)
			return r, err
		}
	}
	return r, fmt.Errorf("hostile %s printed no result: %s", kind, lastLines(out, 3))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}

// procStat is one reading of a ferry process.
type procStat struct {
	T       float64 `json:"t"` // seconds since the run started
	Alive   bool    `json:"alive"`
	RSSKiB  int64   `json:"rss_kib"`
	FDs     int     `json:"fds"`
	Threads int     `json:"threads"`
	CPU     float64 `json:"cpu_s"` // utime+stime
	// Goroutines is ferry_goroutines from /metrics (-1: no answer).
	Goroutines int `json:"goroutines"`
}

func readProc(pid int) procStat {
	var s procStat
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				s.RSSKiB, _ = strconv.ParseInt(f[0], 10, 64)
			}
		}
		if v, ok := strings.CutPrefix(l, "State:"); ok && strings.Contains(v, "zombie") {
			return procStat{}
		}
	}
	s.Alive = true
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(ents)
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid)); err == nil {
		s.Threads = len(ents)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		if i := strings.LastIndexByte(string(b), ')'); i > 0 {
			f := strings.Fields(string(b[i+1:]))
			if len(f) > 13 {
				u, _ := strconv.ParseFloat(f[11], 64)
				st, _ := strconv.ParseFloat(f[12], 64)
				s.CPU = (u + st) / 100 // USER_HZ
			}
		}
	}
	return s
}

func (s *sidecar) stat(t0 time.Time) procStat {
	pr := s.proc()
	if pr == nil {
		return procStat{T: time.Since(t0).Seconds()}
	}
	select {
	case <-pr.Done():
		return procStat{T: time.Since(t0).Seconds()}
	default:
	}
	st := readProc(pr.PID())
	st.Goroutines = -1
	if st.Alive {
		st.Goroutines = goroutines(s.pod)
	}
	st.T = time.Since(t0).Seconds()
	return st
}

// sampler reads both sidecars every interval for the timeline chart and
// keeps the scenario boundaries.
type sampler struct {
	mu      sync.Mutex
	t0      time.Time
	cli     []procStat
	srv     []procStat
	marks   []mark
	stop    chan struct{}
	stopped chan struct{}
}

type mark struct {
	T    float64 `json:"t"`
	Name string  `json:"name"`
}

func (e *env) startSampler(t0 time.Time, every time.Duration) {
	s := &sampler{t0: t0, stop: make(chan struct{}), stopped: make(chan struct{})}
	e.sampler = s
	go func() {
		defer close(s.stopped)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			c, v := e.fcli.stat(t0), e.fsrv.stat(t0)
			s.mu.Lock()
			s.cli, s.srv = append(s.cli, c), append(s.srv, v)
			s.mu.Unlock()
			select {
			case <-tk.C:
			case <-s.stop:
				return
			}
		}
	}()
}

func (s *sampler) mark(name string) {
	s.mu.Lock()
	s.marks = append(s.marks, mark{time.Since(s.t0).Seconds(), name})
	s.mu.Unlock()
}

func (s *sampler) close() {
	close(s.stop)
	<-s.stopped
}

// peak returns the largest RSS and fds of a sidecar's samples in [from, to].
func (s *sampler) peak(cli bool, from, to float64) procStat {
	s.mu.Lock()
	defer s.mu.Unlock()
	xs := s.srv
	if cli {
		xs = s.cli
	}
	var p procStat
	for _, x := range xs {
		if x.T < from || x.T > to || !x.Alive {
			continue
		}
		p.Alive = true
		p.RSSKiB = max(p.RSSKiB, x.RSSKiB)
		p.FDs = max(p.FDs, x.FDs)
		p.Threads = max(p.Threads, x.Threads)
		p.Goroutines = max(p.Goroutines, x.Goroutines)
		p.CPU = max(p.CPU, x.CPU)
	}
	return p
}

// waitSettled waits until a sidecar's fds are back to at most want (the
// connections' sockets are closed asynchronously) or d passes.
func (e *env) waitSettled(s *sidecar, want int, d time.Duration) procStat {
	t0 := e.sampler.t0
	deadline := time.Now().Add(d)
	for {
		st := s.stat(t0)
		if !st.Alive || st.FDs <= want || time.Now().After(deadline) {
			return st
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func writeJSON(file string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}

func (e *env) ferryLog(s *sidecar) string {
	if pr := s.proc(); pr != nil {
		return pr.Output()
	}
	return ""
}

// killSidecar SIGKILLs a sidecar and waits for it to be gone.
func (e *env) killSidecar(s *sidecar) {
	pr := s.proc()
	pr.Signal(syscall.SIGKILL)
	<-pr.Done()
}

var _ = filepath.Join

// saveLogs writes every run of both sidecars to dir (not committed).
func (e *env) saveLogs(file string) error {
	var b strings.Builder
	for _, s := range []*sidecar{e.fcli, e.fsrv} {
		if s == nil {
			continue
		}
		s.mu.Lock()
		for i, pr := range s.all {
			fmt.Fprintf(&b, "===== %s, run %d =====\n%s\n", s.name, i+1, pr.Output())
		}
		s.mu.Unlock()
	}
	for i, l := range e.loadLogs {
		fmt.Fprintf(&b, "===== churn load %d (ticks and failures, seconds since its start) =====\n%s\n", i+1, l)
	}
	return os.WriteFile(file, []byte(b.String()), 0o644)
}
