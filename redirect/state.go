package redirect

import (
	"fmt"
	"slices"
	"strings"
)

// State is one family's nat table as `iptables -t nat -S` prints it.
type State struct {
	Chains   []string            // every chain, in listing order (built-ins first)
	Builtin  map[string]bool     // chains with a policy line (-P)
	Rules    map[string][]string // rule specs per chain, in kernel order
	chainSet map[string]bool
}

// ParseState reads `iptables -S` output (-P, -N and -A lines; blank lines
// and # comments are ignored).
func ParseState(lines []string) (State, error) {
	s := State{Builtin: map[string]bool{}, Rules: map[string][]string{}, chainSet: map[string]bool{}}
	for i, line := range lines {
		line = strings.TrimRight(line, "\r\n ")
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		op, rest, _ := strings.Cut(line, " ")
		name, spec, _ := strings.Cut(rest, " ")
		if name == "" {
			return State{}, fmt.Errorf("iptables -S line %d: %q: missing chain", i+1, line)
		}
		switch op {
		case "-P":
			s.addChain(name)
			s.Builtin[name] = true
		case "-N":
			s.addChain(name)
		case "-A":
			if !s.chainSet[name] {
				return State{}, fmt.Errorf("iptables -S line %d: rule for unlisted chain %s", i+1, name)
			}
			s.Rules[name] = append(s.Rules[name], spec)
		default:
			return State{}, fmt.Errorf("iptables -S line %d: unexpected %q", i+1, line)
		}
	}
	return s, nil
}

func (s *State) addChain(name string) {
	if !s.chainSet[name] {
		s.chainSet[name] = true
		s.Chains = append(s.Chains, name)
	}
}

// HasChain reports whether the chain exists.
func (s State) HasChain(name string) bool { return s.chainSet[name] }

// ownedJumps returns, per chain that is not one of the five, the rules
// that jump (or go) to one of the five. builtinOnly limits the search to the
// built-in chains.
func (s State) ownedJumps(builtinOnly bool) map[string][]string {
	out := map[string][]string{}
	for _, c := range s.Chains {
		if IsOwnedChain(c) || (builtinOnly && !s.Builtin[c]) {
			continue
		}
		for _, spec := range s.Rules[c] {
			if IsOwnedChain(Target(spec)) {
				out[c] = append(out[c], spec)
			}
		}
	}
	return out
}

// Target returns the -j/-g target of a rule spec, or "" if it has none.
func Target(spec string) string {
	toks := tokenize(spec)
	target := ""
	for i := 0; i+1 < len(toks); i++ {
		switch toks[i] {
		case "-j", "--jump", "-g", "--goto":
			target = toks[i+1]
		}
	}
	return target
}

// tokenize splits a rule spec the way iptables-save quotes it: words
// separated by spaces, double-quoted strings with backslash escapes.
func tokenize(spec string) []string {
	var toks []string
	var cur strings.Builder
	inWord, inQuote, escaped := false, false, false
	for _, r := range spec {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped = false
		case inQuote && r == '\\':
			escaped = true
		case r == '"':
			inQuote = !inQuote
			inWord = true
		case r == ' ' && !inQuote:
			if inWord {
				toks = append(toks, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		toks = append(toks, cur.String())
	}
	return toks
}

// upToDate reports whether the table already holds exactly the plan: the
// five chains with the planned rules in order, and in each built-in chain
// exactly the planned jumps into them, in order.
func upToDate(cur State, p Plan) bool {
	want := p.Rules()
	for _, c := range p.Chains() {
		if !cur.HasChain(c) || !slices.Equal(cur.Rules[c], want[c]) {
			return false
		}
	}
	have := cur.ownedJumps(true)
	for c := range cur.Builtin {
		if !slices.Equal(have[c], want[c]) {
			return false
		}
	}
	for c := range want {
		if !IsOwnedChain(c) && !cur.Builtin[c] {
			return false // the plan jumps from a chain the table lacks
		}
	}
	return true
}

// applyTx is the iptables-restore --noflush transaction that turns cur into
// the plan: declaring a chain under --noflush creates it or flushes it,
// the old jumps from built-in chains are deleted and the plan appended.
func applyTx(cur State, p Plan) string {
	t := newRestoreTx(p.Chains())
	t.rules("-D", cur.Chains, cur.ownedJumps(true))
	t.rules("-A", p.chainOrder(), p.Rules())
	return t.commit()
}

// cleanupTx removes the five chains and every jump into them, from any
// chain. It returns "" when there is nothing to remove.
func cleanupTx(cur State) string {
	var owned []string
	for _, c := range Chains() {
		if cur.HasChain(c) {
			owned = append(owned, c)
		}
	}
	jumps := cur.ownedJumps(false)
	if len(owned) == 0 && len(jumps) == 0 {
		return ""
	}
	t := newRestoreTx(owned) // flushes them: the chains may jump to each other
	t.rules("-D", cur.Chains, jumps)
	t.deleteChains(owned)
	return t.commit()
}

// revertTx restores the owned part of prev after a transaction moved the
// table to the plan p: used when a later family fails, so a multi-family
// apply does not leave one family changed. Jumps come back at the end of
// their chains, which may differ from their old position among foreign
// rules; the owned chains come back exactly.
func revertTx(prev State, p Plan) string {
	t := newRestoreTx(p.Chains())
	// The plan's jumps from built-in chains go; its own chains were just
	// flushed by declaring them.
	t.rules("-D", slices.DeleteFunc(p.chainOrder(), IsOwnedChain), p.Rules())
	t.rules("-A", Chains(), prev.Rules)
	t.rules("-A", prev.Chains, prev.ownedJumps(true))
	t.deleteChains(slices.DeleteFunc(p.Chains(), prev.HasChain))
	return t.commit()
}
