// Package archtest holds the test that keeps ferry's import graph the way
// a connection flows (docs/architecture.md): cmd/ferry wires everything;
// proxy uses listener, mtls and its sub-packages; the leaves (listener,
// mtls, redirect, dns, proxy/pump, proxy/catalog, proxy/intentions) import
// nothing of ours; no production package imports cmd/, test/ or
// internal/testkit. It has no code of its own.
package archtest
