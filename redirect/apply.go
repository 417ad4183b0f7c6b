package redirect

import (
	"context"
	"errors"
	"fmt"
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

// Why iptables-restore and not one go-iptables call per rule, as Consul
// does: a restore file is committed as a single transaction (one nftables
// batch, or one table replace with legacy iptables), so the table moves
// from its old state to the plan or stays as it was. Rule-by-rule calls
// leave half a rule set behind when one of them fails or the process is
// killed, which is exactly Consul's "Chain already exists" trap on re-run.
// go-iptables is still used to read the table (see ExecBackend).

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
		if err := j.be.Restore(ctx, j.tx, false); err != nil {
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
	for _, j := range jobs {
		if j.tx == "" {
			continue
		}
		if err := settle(ctx, j.be, j.plan); err != nil {
			return results, err
		}
	}
	return results, nil
}

// settle re-reads a table after a commit and repairs it if another writer
// raced with us: two runs that read the same old table both append their
// jumps, leaving duplicates. The check compares rule counts only, so an
// iptables that spells a rule differently from the plan (another version's
// canonical form) is not mistaken for a race.
func settle(ctx context.Context, be Backend, p Plan) error {
	const attempts = 3
	for i := 0; ; i++ {
		lines, err := be.List(ctx)
		if err != nil {
			return fmt.Errorf("redirect: re-read %s nat table: %w", p.Family, err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return fmt.Errorf("redirect: re-read %s nat table: %w", p.Family, err)
		}
		if sameShape(cur, p) {
			return nil
		}
		if i == attempts {
			return fmt.Errorf("redirect: %s nat table keeps changing under us (another writer?)", p.Family)
		}
		if err := be.Restore(ctx, applyTx(cur, p), false); err != nil {
			return fmt.Errorf("redirect: repair %s rules: %w", p.Family, err)
		}
	}
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
// (Changed false), which is not an error.
func Cleanup(ctx context.Context, backends map[Family]Backend) ([]Result, error) {
	var results []Result
	for _, f := range []Family{IPv4, IPv6} {
		be, ok := backends[f]
		if !ok {
			continue
		}
		lines, err := be.List(ctx)
		if err != nil {
			return results, fmt.Errorf("redirect: read %s nat table: %w", f, err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return results, fmt.Errorf("redirect: read %s nat table: %w", f, err)
		}
		tx := cleanupTx(cur)
		if tx == "" {
			results = append(results, Result{Family: f})
			continue
		}
		if err := be.Restore(ctx, tx, false); err != nil {
			return results, fmt.Errorf("redirect: clean up %s rules: %w", f, err)
		}
		results = append(results, Result{Family: f, Changed: true})
	}
	return results, nil
}
