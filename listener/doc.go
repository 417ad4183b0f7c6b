// Package listener owns accepting TCP connections: accept loops with backoff,
// a connection cap, and recovery of the original destination of a
// redirected connection (SO_ORIGINAL_DST). It imports nothing else of ferry
// (internal/archtest checks it).
package listener
