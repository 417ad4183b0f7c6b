// Package expose serves a proxy registration's Expose.Paths: for each
// listener port, a plain-HTTP server (HTTP/1.1, and h2c when a path asks
// for the http2 protocol) that forwards requests for exactly the listed
// paths (query string ignored, any method) to the local app's
// LocalPathPort, and answers 404 to everything else.
//
// This is what lets the kubelet's HTTP probes reach an app whose own port
// only takes mTLS: consul-k8s rewrites each probe to a 2030x/2040x/2050x
// port, lists it in Expose.Paths and excludes it from inbound redirection,
// and Envoy (here ferry) serves it. The ports serve exactly those paths and
// nothing else. Server.Apply follows registration changes live, opening
// and closing listeners as the list changes.
//
// It imports nothing of ours.
package expose
