// Package servers is ferry's connection to Consul servers when there is no
// local agent (agentless mode, as consul-dataplane runs in consul-k8s):
// finding the servers from -addresses, an HTTP transport that moves to
// another server when the one in use fails, and the ACL token, static or
// from an auth-method login. It imports nothing of ferry's.
package servers

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// execTimeout bounds an exec= discovery command.
const execTimeout = 10 * time.Second

// Discover resolves addresses, in consul-dataplane's -addresses forms, to
// host:port pairs on port:
//
//	exec=<command>   run through /bin/sh -c; its output lists IPs (or
//	                 IP:port) separated by white space
//	a, b, c          a comma or white-space separated list of IPs, IP:port
//	                 or DNS names (every address of a name is used)
//
// The result has no duplicates and keeps the order found.
func Discover(ctx context.Context, addresses string, port int) ([]string, error) {
	addresses = strings.TrimSpace(addresses)
	if addresses == "" {
		return nil, errors.New("no server addresses given (-addresses)")
	}
	if cmd, ok := strings.CutPrefix(addresses, "exec="); ok {
		return discoverExec(ctx, cmd, port)
	}
	var out []string
	seen := map[string]bool{}
	add := func(hp string) {
		if !seen[hp] {
			seen[hp] = true
			out = append(out, hp)
		}
	}
	for _, f := range strings.FieldsFunc(addresses, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' }) {
		host, p, err := splitPort(f, port)
		if err != nil {
			return nil, err
		}
		if ip, err := netip.ParseAddr(host); err == nil {
			add(net.JoinHostPort(ip.String(), strconv.Itoa(p)))
			continue
		}
		ips, err := net.DefaultResolver.LookupHost(ctx, host)
		if err != nil {
			return nil, fmt.Errorf("resolve server address %q: %w", host, err)
		}
		for _, ip := range ips {
			add(net.JoinHostPort(ip, strconv.Itoa(p)))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no server addresses in %q", addresses)
	}
	return out, nil
}

// splitPort splits an optional :port off s (IPv6 needs brackets then).
func splitPort(s string, def int) (string, int, error) {
	if h, p, err := net.SplitHostPort(s); err == nil {
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 || n > 65535 {
			return "", 0, fmt.Errorf("server address %q: bad port", s)
		}
		return h, n, nil
	}
	return strings.Trim(s, "[]"), def, nil
}

func discoverExec(ctx context.Context, command string, port int) ([]string, error) {
	if strings.TrimSpace(command) == "" {
		return nil, errors.New("-addresses exec=: empty command")
	}
	ctx, cancel := context.WithTimeout(ctx, execTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 200 {
			msg = msg[:200] + "..."
		}
		return nil, fmt.Errorf("-addresses exec=%q: %w (stderr: %q)", command, err, msg)
	}
	var out []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Split(bufio.ScanWords)
	for sc.Scan() {
		host, p, err := splitPort(sc.Text(), port)
		if err != nil {
			return nil, fmt.Errorf("-addresses exec=%q: %w", command, err)
		}
		ip, err := netip.ParseAddr(host)
		if err != nil {
			return nil, fmt.Errorf("-addresses exec=%q: %q is not an IP address", command, sc.Text())
		}
		hp := net.JoinHostPort(ip.String(), strconv.Itoa(p))
		if !seen[hp] {
			seen[hp] = true
			out = append(out, hp)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-addresses exec=%q printed no addresses", command)
	}
	return out, nil
}
