package redirect

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Backend is what applying needs from one family's iptables.
type Backend interface {
	// List returns the nat table as `iptables -t nat -S` prints it.
	List(ctx context.Context) ([]string, error)
	// Restore feeds data to `iptables-restore --noflush`. The kernel takes
	// a restore file as one transaction: all of it or none of it. With
	// testOnly the file is only parsed and checked.
	Restore(ctx context.Context, data string, testOnly bool) error
}

// Result says what happened to one family's table.
type Result struct {
	Family  Family
	Changed bool
}

// Why iptables-restore and not one iptables call per rule (go-iptables'
// API, and what Consul does): a restore file is committed as a single
// transaction (one nftables batch, or one table replace with legacy
// iptables), so the table moves from its old state to the plan or stays as
// it was. Rule-by-rule calls leave half a rule set behind when one of them
// fails or the process is killed, and a re-run then trips over the chains
// that do exist (Consul's "Chain already exists"). ExecBackend explains what
// go-iptables is (and is not) used for.

// Apply makes each family's table hold exactly its plan: same config again
// is a no-op (nothing is written); a different config replaces ferry's
// chains and jumps in one transaction per family. Every transaction is
// test-parsed by iptables-restore before any is committed; if a later
// family still fails to commit, the earlier ones are reverted.
func Apply(ctx context.Context, plans []Plan, backends map[Family]Backend) ([]Result, error) {
	type job struct {
		plan Plan
		be   Backend
		cur  State
		tx   string
	}
	var jobs []job
	for _, p := range plans {
		be, ok := backends[p.Family]
		if !ok {
			return nil, fmt.Errorf("redirect: no %s backend", p.Family)
		}
		lines, err := be.List(ctx)
		if err != nil {
			return nil, fmt.Errorf("redirect: read %s nat table: %w", p.Family, err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return nil, fmt.Errorf("redirect: read %s nat table: %w", p.Family, err)
		}
		j := job{plan: p, be: be, cur: cur}
		if !upToDate(cur, p) {
			j.tx = applyTx(cur, p)
		}
		jobs = append(jobs, j)
	}
	for _, j := range jobs {
		if j.tx == "" {
			continue
		}
		if err := j.be.Restore(ctx, j.tx, true); err != nil {
			return nil, fmt.Errorf("redirect: %s rules rejected (nothing changed): %w", j.plan.Family, err)
		}
	}
	var results []Result
	for i, j := range jobs {
		if j.tx == "" {
			results = append(results, Result{Family: j.plan.Family})
			continue
		}
		if err := converge(ctx, j.be, j.plan, j.tx); err != nil {
			err = fmt.Errorf("redirect: apply %s rules: %w", j.plan.Family, err)
			for _, done := range jobs[:i] {
				if done.tx == "" {
					continue
				}
				if rerr := done.be.Restore(ctx, revertTx(done.cur, done.plan), false); rerr != nil {
					err = errors.Join(err, fmt.Errorf("redirect: revert %s rules: %w", done.plan.Family, rerr))
				}
			}
			return nil, err
		}
		results = append(results, Result{Family: j.plan.Family, Changed: true})
	}
	return results, nil
}

// converge commits tx, then re-reads the table until it holds the plan.
// Another run racing with this one (a second ferry, Consul) can make the
// transaction fail, because its -D lines find a jump already gone, or can
// leave duplicate jumps, because both runs read the same old table. Each
// round starts again from what the table holds now. After a successful
// commit only rule counts are compared, so an iptables that spells a rule
// differently from the plan is not mistaken for a race; after a failed
// one the table must match the plan exactly, or the failure stands.
func converge(ctx context.Context, be Backend, p Plan, tx string) error {
	const rounds = 5
	var lastErr error
	for i := 0; i < rounds; i++ {
		if i > 0 {
			// Jitter, so racing runs stop colliding.
			t := time.NewTimer(time.Duration(5+rand.IntN(45)) * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
		}
		lastErr = be.Restore(ctx, tx, false)
		lines, err := be.List(ctx)
		if err != nil {
			return fmt.Errorf("re-read nat table: %w", err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return fmt.Errorf("re-read nat table: %w", err)
		}
		if (lastErr == nil && sameShape(cur, p)) || upToDate(cur, p) {
			return nil
		}
		tx = applyTx(cur, p)
	}
	if lastErr != nil {
		return lastErr
	}
	return errors.New("the nat table keeps changing under us (another writer?)")
}

// sameShape reports whether every owned chain and every built-in chain's
// set of jumps into them has as many rules as the plan says.
func sameShape(cur State, p Plan) bool {
	want := p.Rules()
	for _, c := range p.Chains() {
		if !cur.HasChain(c) || len(cur.Rules[c]) != len(want[c]) {
			return false
		}
	}
	have := cur.ownedJumps(true)
	for c := range cur.Builtin {
		if len(have[c]) != len(want[c]) {
			return false
		}
	}
	return true
}

// Cleanup removes the five chains and every jump into them from each
// family's table, and nothing else. A table without them is left alone
// (Changed false), which is not an error. A transaction that fails because
// another run changed the table meanwhile is retried from the new state.
func Cleanup(ctx context.Context, backends map[Family]Backend) ([]Result, error) {
	var results []Result
	for _, f := range []Family{IPv4, IPv6} {
		be, ok := backends[f]
		if !ok {
			continue
		}
		changed, err := cleanupFamily(ctx, be)
		if err != nil {
			return results, fmt.Errorf("redirect: clean up %s rules: %w", f, err)
		}
		results = append(results, Result{Family: f, Changed: changed})
	}
	return results, nil
}

func cleanupFamily(ctx context.Context, be Backend) (changed bool, err error) {
	const rounds = 5
	var lastErr error
	for i := 0; i < rounds; i++ {
		lines, err := be.List(ctx)
		if err != nil {
			return changed, fmt.Errorf("read nat table: %w", err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return changed, fmt.Errorf("read nat table: %w", err)
		}
		tx := cleanupTx(cur)
		if tx == "" {
			return changed, nil
		}
		if i > 0 {
			t := time.NewTimer(time.Duration(5+rand.IntN(45)) * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return changed, ctx.Err()
			case <-t.C:
			}
		}
		if lastErr = be.Restore(ctx, tx, false); lastErr == nil {
			changed = true
		}
	}
	return changed, lastErr
}
