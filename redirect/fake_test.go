package redirect

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// fakeTable is a stateful in-memory nat table with iptables-restore
// --noflush semantics: a chain must exist before a rule goes into it or
// jumps to it, -D needs an identical rule, -X needs an empty unreferenced
// chain, a declared user chain is created or flushed, and a file that fails
// anywhere changes nothing.
type fakeTable struct {
	chains []string // creation order, built-ins first
	rules  map[string][]string
	user   map[string]bool

	writes, tests int          // Restore calls that committed / only tested
	failCommit    func() error // injected failure for committing restores
	// beforeCommit runs just before a committing restore lands: a
	// concurrent writer whose change the transaction did not see.
	beforeCommit func(t *fakeTable)
}

func newFakeTable() *fakeTable {
	t := &fakeTable{rules: map[string][]string{}, user: map[string]bool{}}
	for _, c := range []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"} {
		t.chains = append(t.chains, c)
		t.rules[c] = nil
	}
	return t
}

func (t *fakeTable) clone() *fakeTable {
	c := &fakeTable{chains: slices.Clone(t.chains), rules: map[string][]string{}, user: map[string]bool{}}
	for k, v := range t.rules {
		c.rules[k] = slices.Clone(v)
	}
	for k, v := range t.user {
		c.user[k] = v
	}
	return c
}

func (t *fakeTable) exists(c string) bool { _, ok := t.rules[c]; return ok }

var standardTargets = map[string]bool{"ACCEPT": true, "DROP": true, "RETURN": true, "REDIRECT": true, "DNAT": true, "SNAT": true, "MASQUERADE": true}

// exec runs one iptables command (without "-t nat") against t.
func (t *fakeTable) exec(line string) error {
	op, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
	chain, spec, _ := strings.Cut(rest, " ")
	if chain == "" {
		return fmt.Errorf("%q: no chain", line)
	}
	checkRule := func() error {
		if !t.exists(chain) {
			return fmt.Errorf("%q: chain %s does not exist", line, chain)
		}
		if tg := Target(spec); tg == "" {
			return fmt.Errorf("%q: no target", line)
		} else if !standardTargets[tg] && !t.user[tg] {
			return fmt.Errorf("%q: target chain %s does not exist", line, tg)
		}
		return nil
	}
	switch op {
	case "-N":
		if t.exists(chain) {
			return fmt.Errorf("%q: chain already exists", line)
		}
		t.chains = append(t.chains, chain)
		t.rules[chain] = nil
		t.user[chain] = true
	case "-A":
		if err := checkRule(); err != nil {
			return err
		}
		t.rules[chain] = append(t.rules[chain], spec)
	case "-I":
		if err := checkRule(); err != nil {
			return err
		}
		t.rules[chain] = append([]string{spec}, t.rules[chain]...)
	case "-D":
		i := slices.Index(t.rules[chain], spec)
		if i < 0 {
			return fmt.Errorf("%q: no such rule", line)
		}
		t.rules[chain] = slices.Delete(t.rules[chain], i, i+1)
	case "-F":
		if !t.exists(chain) {
			return fmt.Errorf("%q: no such chain", line)
		}
		t.rules[chain] = nil
	case "-X":
		if !t.user[chain] {
			return fmt.Errorf("%q: not a user chain", line)
		}
		if len(t.rules[chain]) > 0 {
			return fmt.Errorf("%q: chain not empty", line)
		}
		for _, c := range t.chains {
			for _, r := range t.rules[c] {
				if Target(r) == chain {
					return fmt.Errorf("%q: chain is referenced", line)
				}
			}
		}
		delete(t.rules, chain)
		delete(t.user, chain)
		t.chains = slices.DeleteFunc(t.chains, func(c string) bool { return c == chain })
	default:
		return fmt.Errorf("%q: unsupported command", line)
	}
	return nil
}

func (t *fakeTable) List(ctx context.Context) ([]string, error) {
	var out []string
	for _, c := range t.chains {
		if t.user[c] {
			out = append(out, "-N "+c)
		} else {
			out = append(out, "-P "+c+" ACCEPT")
		}
	}
	for _, c := range t.chains {
		for _, r := range t.rules[c] {
			out = append(out, "-A "+c+" "+r)
		}
	}
	return out, nil
}

func (t *fakeTable) Restore(ctx context.Context, data string, testOnly bool) error {
	work := t.clone()
	lines := strings.Split(strings.TrimRight(data, "\n"), "\n")
	if len(lines) < 2 || lines[0] != "*nat" || lines[len(lines)-1] != "COMMIT" {
		return errors.New("restore: want *nat ... COMMIT")
	}
	for i, line := range lines[1 : len(lines)-1] {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, ":") {
			name, _, _ := strings.Cut(line[1:], " ")
			switch {
			case work.user[name]:
				work.rules[name] = nil // --noflush: a declared user chain is flushed
			case work.exists(name):
			default:
				if err := work.exec("-N " + name); err != nil {
					return fmt.Errorf("restore line %d: %w", i+2, err)
				}
			}
			continue
		}
		if err := work.exec(line); err != nil {
			return fmt.Errorf("restore line %d: %w", i+2, err)
		}
	}
	if testOnly {
		t.tests++
		return nil
	}
	if t.failCommit != nil {
		if err := t.failCommit(); err != nil {
			return err
		}
	}
	t.writes++
	if t.beforeCommit != nil {
		hook := t.beforeCommit
		t.beforeCommit = nil
		hook(t)
		// Replay the file on top of the other writer's state, as the
		// kernel would serialize the two transactions.
		return t.Restore(ctx, data, false)
	}
	t.chains, t.rules, t.user = work.chains, work.rules, work.user
	return nil
}

// dump is the table as text, for comparisons and failure messages.
func (t *fakeTable) dump() string {
	lines, _ := t.List(context.Background())
	return strings.Join(lines, "\n")
}
