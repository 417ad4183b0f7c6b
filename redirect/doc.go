// Package redirect builds and applies the pod's traffic redirection rules:
// the same nat table as Consul's sdk/iptables, applied atomically and
// idempotently. It imports nothing else of ferry.
//
// The flow is data first, kernel last:
//
//   - Config holds the operator's input as text, each value labelled with the
//     flag, annotation or JSON field it came from (ParseConsulJSON,
//     ApplyAnnotations, LookupProxy and the CLI fill it).
//   - Config.Validate checks every value at once and returns a Spec in the
//     canonical form iptables-save prints.
//   - Build turns a Spec into one Plan per address family. A Plan is
//     sdk/iptables' command list (-N, -A, -I in Consul's order) and renders
//     the resulting state in iptables-restore format.
//   - Apply reads each family's table through a Backend, does nothing when it
//     already matches, and otherwise commits one iptables-restore --noflush
//     transaction per family. Cleanup removes the five chains and every
//     jump into them.
//
// ferry owns the five chains by name (they are Consul's names, so each tool
// cleans up after the other) and the jumps into them from the built-in
// chains; nothing else in the table is touched.
//
// Imports: nothing of ferry's (internal/archtest checks it); cmd/ferry and
// the CNI plugin drive it.
package redirect
