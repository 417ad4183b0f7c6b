// Package mtls owns mesh identity: the service's leaf certificate and the
// CA roots issued by Consul, kept current, and the TLS configurations that
// present them and verify peers by SPIFFE ID. It imports nothing else of ferry.
package mtls
