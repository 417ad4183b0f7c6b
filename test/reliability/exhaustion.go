package main

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// exhaustion: the client sidecar at a low fd limit, then a slowloris and
// slow readers.
func (e *env) exhaustion(p params) *scenario {
	s := &scenario{Name: "resource exhaustion", Load: fmt.Sprintf("%d held connections through a client sidecar limited to %d fds; %d silent TLS clients on the inbound port; %d slow readers", p.FDConns, p.FDLimit, p.Slowloris, p.SlowReaders),
		Fault: "fd limit reached; slowloris; clients that never read"}
	e.begin(s)
	defer e.end(s)

	// 1. fd limit: restart the client sidecar under prlimit.
	e.fcli.proc().Stop()
	e.fcli.wrap = []string{"prlimit", fmt.Sprintf("--nofile=%d:%d", p.FDLimit, p.FDLimit), "--"}
	if _, err := e.startSidecar(e.fcli); err != nil {
		s.failf("start the fd-limited sidecar: %v", err)
		return s
	}
	e.sampler.mark("fd limit " + strconv.Itoa(p.FDLimit))
	base := e.fcli.stat(e.sampler.t0)
	pr, err := e.startLoad("-hold", strconv.Itoa(p.FDConns), "-parallel", "50", "-dial-timeout", "3s", "-stall", "5s")
	if err != nil {
		s.failf("load: %v", err)
		return s
	}
	if err := pr.WaitOutput("opened", 5*time.Minute); err != nil {
		s.failf("load: %v", err)
	}
	opened, _, _ := parseLoad(pr.Output())
	full := e.fcli.stat(e.sampler.t0)
	// While at the limit: is ferry spinning? CPU over 2 s.
	time.Sleep(2 * time.Second)
	full2 := e.fcli.stat(e.sampler.t0)
	cpuAtLimit := full2.CPU - full.CPU
	pr.Signal(syscall.SIGUSR1)
	pr.Wait(2 * time.Minute)
	res, _, _ := parseLoad(pr.Output())
	s.Attempted += opened.Attempted
	s.Failed += opened.ConnectFail + opened.Reset + opened.Stalled + opened.Other
	if opened.Truncated+res.Truncated > 0 {
		s.failf("fd limit: %d held connections ended in a clean EOF before their data came back", opened.Truncated+res.Truncated)
	}
	if opened.Corrupt+res.Corrupt > 0 {
		s.failf("fd limit: corrupted echo")
	}
	s.BytesVerified += opened.BytesVerified + res.BytesVerified
	s.detailf("fd limit %d: %d of %d connections opened (ferry at %d fds), %d refused or reset (%v); %d of the opened ones closed cleanly after", p.FDLimit, opened.Open, p.FDConns, full.FDs, p.FDConns-int(opened.Open), firstErr(opened), res.OK)
	s.detailf("fd limit: ferry used %.2f CPU s in 2 s while at the limit with the excess connections refused", cpuAtLimit)
	if res.OK != opened.Open {
		s.failf("fd limit: %d held connections failed at close: %v", opened.Open-res.OK, res.Errors)
	}
	if cpuAtLimit > 1.0 {
		s.failf("fd limit: ferry spins at the limit (%.2f CPU s in 2 s)", cpuAtLimit)
	}
	st := e.waitSettled(e.fcli, base.FDs+fdSlack, 20*time.Second)
	idle0 := st.CPU
	time.Sleep(2 * time.Second)
	idle := e.fcli.stat(e.sampler.t0)
	s.detailf("fd limit: after the load closed, ferry at %d fds (%d before) and %.2f CPU s in 2 s idle", st.FDs, base.FDs, idle.CPU-idle0)
	if !st.Alive {
		s.failf("fd limit: the sidecar exited:\n%s", lastLines(e.ferryLog(e.fcli), 10))
		return s
	}
	if idle.CPU-idle0 > 0.5 {
		s.failf("fd limit: ferry spins after the load left (%.2f CPU s in 2 s)", idle.CPU-idle0)
	}
	if err := e.probe(); err != nil {
		s.failf("fd limit: no recovery once fds were free: %v", err)
	}
	if n := strings.Count(e.ferryLog(e.fcli), "too many open files"); n > 0 {
		s.detailf("fd limit: ferry logged %d line(s) naming 'too many open files'", n)
	} else {
		s.Findings = append(s.Findings, "fd limit: ferry's log does not say 'too many open files' (what it says: "+strings.Join(sampleLines(e.ferryLog(e.fcli), 3), " / ")+")")
	}
	e.fcli.proc().Stop()
	e.fcli.wrap = nil
	if _, err := e.startSidecar(e.fcli); err != nil {
		s.failf("restart: %v", err)
		return s
	}
	if err := e.probe(); err != nil {
		s.failf("restart: %v", err)
	}
	s.stat(e, "before")

	// 2. slowloris on the server side's inbound port, verified traffic
	// from the client side at the same time.
	e.sampler.mark("slowloris")
	srvLog0 := len(e.ferryLog(e.fsrv))
	inbound := net.JoinHostPort(e.srvPod.IP.String(), strconv.Itoa(inboundPort))
	lp, err := e.startLoad("-streams", "2", "-churn", "2", "-dur", "10m")
	if err != nil {
		s.failf("load: %v", err)
		return s
	}
	t0 := time.Since(e.sampler.t0).Seconds()
	hr, err := e.hostile(e.outside, "slowloris", inbound, p.Slowloris, "-hold", p.Hold.String())
	t1 := time.Since(e.sampler.t0).Seconds()
	if err != nil {
		s.failf("slowloris: %v", err)
	}
	pk := e.sampler.peak(false, t0, t1)
	b := s.Stats["server"]["before"]
	s.Stats["server"]["slowloris"] = pk
	s.detailf("slowloris: %d silent clients held %v: server-side sidecar peak %d KiB RSS (+%d), %d fds (+%d); %d of them were closed by ferry within the hold (handshake budget / deadline)", hr.Attempts-hr.Refused, p.Hold, pk.RSSKiB, pk.RSSKiB-b.RSSKiB, pk.FDs, pk.FDs-b.FDs, hr.Closed)

	// 3. slow readers through both sidecars to the echo app.
	e.sampler.mark("slow readers")
	t0 = time.Since(e.sampler.t0).Seconds()
	hr, err = e.hostile(e.cliPod, "slow-reader", e.vip, p.SlowReaders, "-hold", p.Hold.String())
	t1 = time.Since(e.sampler.t0).Seconds()
	if err != nil {
		s.failf("slow readers: %v", err)
	}
	for _, k := range []string{"client", "server"} {
		pk := e.sampler.peak(k == "client", t0, t1)
		b := s.Stats[k]["before"]
		s.Stats[k]["slow readers"] = pk
		s.detailf("slow readers: %d connections wrote %s and never read; %s sidecar peak %d KiB RSS (+%d KiB, %.0f KiB per connection)", hr.Attempts-hr.Refused, bytesStr(hr.BytesSent), k, pk.RSSKiB, pk.RSSKiB-b.RSSKiB, float64(pk.RSSKiB-b.RSSKiB)/float64(max(1, hr.Attempts)))
	}
	lp.Signal(syscall.SIGTERM)
	lp.Wait(time.Minute)
	lr, _, err := parseLoad(lp.Output())
	if err != nil {
		s.failf("%v", err)
	}
	s.count(lr)
	evicted := strings.Count(e.ferryLog(e.fsrv)[srvLog0:], "budget=source max_pending=256 max_pending_per_source=32 remote="+e.cliPod.IP.String()+":")
	if lr.Reset > 0 && lr.ConnectFail+lr.Stalled+lr.Other == 0 && evicted > 0 {
		// The same defect as the burst in the concurrency scenario: the
		// client pod's handshakes, slowed by the load, overran the
		// per-source budget and the oldest were reset.
		s.Findings = append(s.Findings, fmt.Sprintf("KNOWN DEFECT (not failed on): %d verified connection(s) reset during the slow readers: the server-side sidecar logged %d per-source handshake budget eviction(s) of the client pod's IP (see the concurrency scenario's burst)", lr.Reset, evicted))
		lr.Reset = 0
	}
	if bad := lr.ConnectFail + lr.Reset + lr.Stalled + lr.Other; bad > 0 {
		s.failf("verified traffic during the slowloris and slow readers: %d connect failures, %d resets, %d stalls, %d other (%v)", lr.ConnectFail, lr.Reset, lr.Stalled, lr.Other, lr.Errors)
	}
	s.settle(e)
	return s
}

func firstErr(s snapshot) string {
	var parts []string
	for k, v := range s.Errors {
		if len(v) > 120 {
			v = v[:120] + "…"
		}
		parts = append(parts, k+": "+v)
	}
	return strings.Join(parts, "; ")
}
