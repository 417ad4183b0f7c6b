package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/test/testbed"
)

// The TLS mode of each path: where its TLS records are sealed and opened.
// Ferry paths are read from the sidecars' own counter
// (ferry_mesh_tls_sessions_total, both sidecars summed) after the run;
// the others are fixed.
var fixedTLSModes = map[string]string{
	pDirect:   "none (plain TCP)",
	pFerryPT:  "none (plain TCP, passthrough)",
	pFerryPTB: "none (plain TCP, passthrough)",
	pConsul:   "userspace (Go crypto/tls)",
	pHAProxy:  "userspace (OpenSSL)",
}

// kernelTLSNote says whether this machine can run ferry with kernel TLS,
// for the report: on a kernel without the tls module the kTLS path falls
// back to user space and the run cannot show kernel TLS's gain.
func kernelTLSNote() string {
	if err := ktls.Check(); err != nil {
		return "kernel TLS: unavailable here (" + err.Error() + "): every ferry mTLS session runs in user-space TLS, so this run cannot show what kernel TLS gains; run the bench on a node with the tls module (`modprobe tls`), where the path \"" + pathNames[pFerryKTLS] + "\" runs side by side with the others by default"
	}
	return "kernel TLS: available (the tls module is loaded): the path \"" + pathNames[pFerryKTLS] + "\" hands its sessions to the kernel"
}

// ktlsByDefault: the kernel TLS path joins the default run only where the
// kernel has kernel TLS (elsewhere it is the mTLS pair without tunnels).
func ktlsByDefault() bool { return ktls.Check() == nil }

// tlsModes fills each path's TLS mode: fixed, or scraped from its ferry
// sidecars' admin endpoints (127.0.0.1:19000 in their pods).
func (e *env) tlsModes(paths []*path) {
	for _, p := range paths {
		if m, ok := fixedTLSModes[p.ID]; ok {
			p.TLS = m
			continue
		}
		if p.NA != "" || len(p.ferryPods) == 0 {
			continue
		}
		total := map[string]int64{}
		for _, pod := range p.ferryPods {
			out, err := e.exec(pod, testbed.Proc{}, 15*time.Second, e.self, "tlsmodes", "-addr", "127.0.0.1:19000")
			if err != nil {
				p.TLS = "unknown (" + oneLine(err.Error()) + ")"
				break
			}
			for _, f := range strings.Fields(out) {
				if k, v, ok := strings.Cut(f, "="); ok {
					n, _ := strconv.ParseInt(v, 10, 64)
					total[k] += n
				}
			}
		}
		if p.TLS == "" {
			p.TLS = describeModes(total)
		}
	}
}

// describeModes is e.g. "ktls (128 sessions)" or "userspace 3, fallback 2".
func describeModes(m map[string]int64) string {
	var keys []string
	for k, n := range m {
		if n > 0 {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	switch len(keys) {
	case 0:
		return "no mTLS session counted"
	case 1:
		return fmt.Sprintf("%s (%d sessions, both sidecars)", keys[0], m[keys[0]])
	}
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ") + " sessions (both sidecars)"
}

// tlsModesMain (`bench tlsmodes -addr`) prints a ferry's mTLS sessions by
// mode, summed over directions: "ktls=N userspace=M fallback=K".
func tlsModesMain(args []string) error {
	fs := flag.NewFlagSet("tlsmodes", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:19000", "ferry admin address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/metrics", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	modes, err := parseTLSModes(bufio.NewScanner(resp.Body))
	if err != nil {
		return err
	}
	var parts []string
	for _, k := range []string{"ktls", "userspace", "fallback"} {
		parts = append(parts, fmt.Sprintf("%s=%d", k, modes[k]))
	}
	fmt.Println(strings.Join(parts, " "))
	return nil
}

// parseTLSModes sums ferry_mesh_tls_sessions_total by its mode label.
func parseTLSModes(sc *bufio.Scanner) (map[string]int64, error) {
	const name = "ferry_mesh_tls_sessions_total{"
	m := map[string]int64{}
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		_, mode, ok := strings.Cut(labels, `mode="`)
		if !ok {
			continue
		}
		mode, _, _ = strings.Cut(mode, `"`)
		n, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", line, err)
		}
		m[mode] += n
	}
	return m, sc.Err()
}
