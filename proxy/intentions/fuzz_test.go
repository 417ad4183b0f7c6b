package intentions

import (
	"encoding/json"
	"testing"

	"github.com/hashicorp/consul/api"
)

// FuzzEvaluator compiles arbitrary intention lists as the agent's JSON
// would carry them (wrong types, missing fields, wildcards anywhere, L7
// permissions, absurd precedences) and asks for decisions: never a panic,
// and the same question always gets the same answer.
func FuzzEvaluator(f *testing.F) {
	for _, s := range []string{
		`[{"SourceName":"web","SourceNS":"default","DestinationName":"db","Action":"allow","Precedence":9}]`,
		`[{"SourceName":"*","SourceNS":"*","DestinationName":"db","Action":"deny","Precedence":5},{"SourceName":"web","Action":"allow","Precedence":9}]`,
		`[{"SourceName":"web","SourceNS":"*","Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/"}}],"Precedence":8}]`,
		`[{"SourceName":"*","SourceNS":"team","SourcePartition":"other","Action":"allow","Precedence":-1}]`,
		`[{"SourceName":"","Action":"","Precedence":1e9}]`,
		`[null,{"SourceName":"WEB","Action":"ALLOW"}]`,
		`[{"SourceName":1}]`, `null`, `[]`,
	} {
		f.Add([]byte(s), false, "web", "default", "")
	}
	f.Fuzz(func(t *testing.T, body []byte, defaultAllow bool, name, ns, partition string) {
		var ixns []*api.Intention
		if json.Unmarshal(body, &ixns) != nil {
			return
		}
		kept := ixns[:0]
		for _, ixn := range ixns {
			if ixn != nil { // the agent never sends null entries; the decoder would
				kept = append(kept, ixn)
				_ = Describe(ixn)
			}
		}
		e := NewEvaluator(kept, defaultAllow)
		src := Source{Name: name, Namespace: ns, Partition: partition}
		d1, d2 := e.Decide(src), e.Decide(src)
		if d1 != d2 {
			t.Fatalf("Decide(%v) not deterministic: %+v then %+v", src, d1, d2)
		}
		if d1.Allow && d1.Reason == ReasonNotLoaded {
			t.Fatalf("allowed with reason %q", d1.Reason)
		}
	})
}
