package redirect

import "strings"

// restoreTx writes one iptables-restore transaction on the nat table.
type restoreTx struct{ b strings.Builder }

// newRestoreTx opens the transaction and declares chains: under --noflush
// a declared chain is created, or flushed if it exists.
func newRestoreTx(declare []string) *restoreTx {
	t := &restoreTx{}
	t.b.WriteString("*" + Table + "\n")
	for _, c := range declare {
		t.b.WriteString(":" + c + " - [0:0]\n")
	}
	return t
}

// rules writes op ("-A" or "-D") for every rule of rules, chain by chain
// in order.
func (t *restoreTx) rules(op string, order []string, rules map[string][]string) {
	for _, c := range order {
		for _, spec := range rules[c] {
			t.b.WriteString(op + " " + c + " " + spec + "\n")
		}
	}
}

// deleteChains deletes (empty, unreferenced) chains.
func (t *restoreTx) deleteChains(chains []string) {
	for _, c := range chains {
		t.b.WriteString("-X " + c + "\n")
	}
}

func (t *restoreTx) commit() string {
	t.b.WriteString("COMMIT\n")
	return t.b.String()
}
