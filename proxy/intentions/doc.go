// Package intentions decides, for one destination service, whether a mesh
// client may connect, the way Consul's L4 authorize endpoint does, but
// locally: the intentions for the destination are watched with a blocking
// query and compiled into an Evaluator whose Decide is a map lookup.
//
// Three pieces:
//   - Evaluator: pure, immutable, built from the intentions in precedence
//     order plus the default decision.
//   - Watcher: keeps the current Evaluator (atomic swap), fails closed until
//     the first list arrives and keeps the last list while the agent is
//     unreachable.
//   - Tracker: live connections registered by source; after every change the
//     Watcher closes those whose source is now denied (live revocation).
package intentions
