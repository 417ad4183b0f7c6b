package mtls

import "crypto/tls"

// curvePreferences: see the benchmark note in the package tests
// (BenchmarkHandshake) — decided below.
var curvePreferences = []tls.CurveID{tls.X25519, tls.CurveP256}
