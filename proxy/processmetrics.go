package proxy

import (
	"fmt"
	"io"
	"os"
	"runtime"
)

// processCollector reports the process's goroutines and open fds, read at
// scrape time: the two figures that show a leak first (a connection that
// never ends keeps its goroutines and fds). Named ferry_* rather than
// Prometheus's go_goroutines and process_open_fds so that they cannot
// collide with the app's own series on the merged metrics endpoint.
type processCollector struct{}

func (processCollector) WritePrometheus(w io.Writer) {
	fmt.Fprintf(w, "# HELP ferry_goroutines Goroutines in the ferry process.\n# TYPE ferry_goroutines gauge\nferry_goroutines %d\n",
		runtime.NumGoroutine())
	if n, err := openFDs(); err == nil {
		fmt.Fprintf(w, "# HELP ferry_open_fds Open file descriptors of the ferry process.\n# TYPE ferry_open_fds gauge\nferry_open_fds %d\n", n)
	}
}

// openFDs counts /proc/self/fd, less the fd it reads the directory with.
func openFDs() (int, error) {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	defer d.Close()
	n := 0
	for {
		names, err := d.Readdirnames(1024)
		n += len(names)
		if err == io.EOF {
			return n - 1, nil
		}
		if err != nil {
			return n, err
		}
	}
}
