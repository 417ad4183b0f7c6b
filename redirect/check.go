package redirect

import (
	"context"
	"fmt"
	"slices"
)

// Check reports whether every family's table holds exactly its plan, as
// Apply would leave it, and changes nothing. The error names the first
// chain that differs. (A CNI plugin's CHECK uses it.)
func Check(ctx context.Context, plans []Plan, backends map[Family]Backend) error {
	for _, p := range plans {
		be, ok := backends[p.Family]
		if !ok {
			return fmt.Errorf("redirect: no %s backend", p.Family)
		}
		lines, err := be.List(ctx)
		if err != nil {
			return fmt.Errorf("redirect: read %s nat table: %w", p.Family, err)
		}
		cur, err := ParseState(lines)
		if err != nil {
			return fmt.Errorf("redirect: read %s nat table: %w", p.Family, err)
		}
		if upToDate(cur, p) {
			continue
		}
		return fmt.Errorf("redirect: %s nat table does not hold the rules: %s", p.Family, firstDifference(cur, p))
	}
	return nil
}

// firstDifference describes, for an error message, where cur departs from p.
func firstDifference(cur State, p Plan) string {
	want := p.Rules()
	for _, c := range p.Chains() {
		if !cur.HasChain(c) {
			return "chain " + c + " is missing"
		}
		if !slices.Equal(cur.Rules[c], want[c]) {
			return fmt.Sprintf("chain %s has %q, want %q", c, cur.Rules[c], want[c])
		}
	}
	have := cur.ownedJumps(true)
	for c := range cur.Builtin {
		if !slices.Equal(have[c], want[c]) {
			return fmt.Sprintf("chain %s jumps %q, want %q", c, have[c], want[c])
		}
	}
	return "a planned jump comes from a chain the table lacks"
}
