// Package uml runs tests that need kernel features the build machine
// lacks inside User-Mode Linux: Debian's user-mode-linux package boots a
// kernel as an ordinary process, with the host's filesystem as its
// read-only root (hostfs) and a test binary as its init
// (internal/umlinit). Today: the ktls package's suite, and the proxy
// package's kernel TLS data path between two sidecars, against a kernel
// that has the tls module.
package uml
