package testbed

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// markerDir holds one file per live testbed naming the process that owns it,
// so a later run can remove what a killed run left behind.
const markerDir = "/run/ferry-testbed"

// interrupts runs every live testbed's teardown when the test process is
// interrupted (go test's Ctrl-C or a CI timeout's SIGTERM): t.Cleanup does
// not run then. Package-level because signals are process-wide.
var interrupts = &interruptSet{funcs: map[int]func(){}}

type interruptSet struct {
	mu    sync.Mutex
	next  int
	funcs map[int]func()
	once  sync.Once
}

func (s *interruptSet) add(f func()) (remove func()) {
	s.once.Do(func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
		go func() {
			sig := <-ch
			s.mu.Lock()
			fs := make([]func(), 0, len(s.funcs))
			for _, f := range s.funcs {
				fs = append(fs, f)
			}
			s.mu.Unlock()
			for _, f := range fs {
				f()
			}
			fmt.Fprintf(os.Stderr, "testbed: %v: cleaned up, exiting\n", sig)
			os.Exit(2)
		}()
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.next
	s.next++
	s.funcs[id] = f
	return func() {
		s.mu.Lock()
		delete(s.funcs, id)
		s.mu.Unlock()
	}
}

func writeMarker(id string) error {
	if err := os.MkdirAll(markerDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(markerDir, id), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
}

func removeMarker(id string) { os.Remove(filepath.Join(markerDir, id)) }

// addMarkerPID records a process outside the pods (the agent) that the
// sweep must kill along with the testbed.
func addMarkerPID(id string, pid int) {
	f, err := os.OpenFile(filepath.Join(markerDir, id), os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "child %d\n", pid)
}

// sweepStale removes the namespaces, links, resolv.conf directories and
// processes of testbeds whose owning process no longer exists.
func sweepStale() {
	entries, err := os.ReadDir(markerDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		id := e.Name()
		b, err := os.ReadFile(filepath.Join(markerDir, id))
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		pid, err := strconv.Atoi(strings.TrimSpace(lines[0]))
		if err == nil && syscall.Kill(pid, 0) == nil {
			continue // owner alive
		}
		for _, l := range lines[1:] {
			if c, ok := strings.CutPrefix(l, "child "); ok {
				// Only if the pid still is this testbed's agent: pids get reused.
				cpid, err := strconv.Atoi(c)
				cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cpid))
				if err == nil && strings.Contains(string(cmdline), "ferry-"+id) {
					syscall.Kill(cpid, syscall.SIGKILL)
				}
			}
		}
		teardownByID(id)
		removeMarker(id)
	}
}

// teardownByID removes everything named after a testbed id. It is the
// fallback path; the normal path tears down the exact objects it created.
func teardownByID(id string) {
	prefix := nsPrefix(id)
	out, _ := output("ip", "netns", "list")
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if strings.HasPrefix(name, prefix) {
			deleteNetns(name)
		}
	}
	run("ip", "link", "del", bridgeName(id))
}

// deleteNetns kills every process in the namespace, then removes it and its
// /etc/netns directory.
func deleteNetns(name string) {
	if out, err := output("ip", "netns", "pids", name); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	run("ip", "netns", "del", name)
	os.RemoveAll(filepath.Join("/etc/netns", name))
}

func nsPrefix(id string) string   { return "ferry-" + id + "-" }
func bridgeName(id string) string { return "fb" + id }
