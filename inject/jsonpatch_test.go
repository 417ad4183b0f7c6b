package inject

import (
	"encoding/json"
	"reflect"
	"testing"
)

func roundTrip(t testing.TB, a, b string) []Op {
	t.Helper()
	ops, err := DiffJSON([]byte(a), []byte(b))
	if err != nil {
		t.Fatalf("DiffJSON: %v", err)
	}
	got, err := ApplyJSON([]byte(a), ops)
	if err != nil {
		t.Fatalf("ApplyJSON(%s, %v): %v", a, ops, err)
	}
	gv, _ := decodeJSON(got)
	wv, _ := decodeJSON([]byte(b))
	if !reflect.DeepEqual(gv, wv) {
		t.Fatalf("apply(diff(a,b), a) = %s, want %s (ops %v)", got, b, ops)
	}
	return ops
}

func TestDiffApplyRoundTrip(t *testing.T) {
	cases := []struct {
		name, a, b string
		wantOps    int
	}{
		{"equal", `{"a":1}`, `{"a":1}`, 0},
		{"add member", `{"a":1}`, `{"a":1,"b/c~":2}`, 1},
		{"remove member", `{"a":1,"b":2}`, `{"a":1}`, 1},
		{"replace scalar", `{"a":1}`, `{"a":"x"}`, 1},
		{"append", `{"l":[1,2]}`, `{"l":[1,2,3,4]}`, 2},
		{"truncate", `{"l":[1,2,3]}`, `{"l":[1]}`, 2},
		{"prepend named", `{"c":[{"name":"app","x":1}]}`, `{"c":[{"name":"side"},{"name":"app","x":2}]}`, 2},
		{"named insert and remove", `{"c":[{"name":"a"},{"name":"b"},{"name":"c"}]}`, `{"c":[{"name":"n"},{"name":"a"},{"name":"c","v":1},{"name":"m"}]}`, 4},
		{"named reorder falls back", `{"c":[{"name":"a"},{"name":"b"}]}`, `{"c":[{"name":"b"},{"name":"a"}]}`, 2},
		{"whole document", `1`, `{"a":1}`, 1},
		{"big integers survive", `{"n":9007199254740993}`, `{"n":9007199254740993,"m":1}`, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ops := roundTrip(t, c.a, c.b)
			if len(ops) != c.wantOps {
				t.Errorf("%d ops, want %d: %v", len(ops), c.wantOps, ops)
			}
		})
	}
}

func TestOpJSON(t *testing.T) {
	b, err := json.Marshal([]Op{{Op: "add", Path: "/a", Value: nil}, {Op: "remove", Path: "/b"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := `[{"op":"add","path":"/a","value":null},{"op":"remove","path":"/b"}]`; string(b) != want {
		t.Errorf("%s, want %s", b, want)
	}
}

func TestApplyErrors(t *testing.T) {
	for _, ops := range [][]Op{
		{{Op: "replace", Path: "/missing", Value: 1}},
		{{Op: "remove", Path: "/l/5"}},
		{{Op: "add", Path: "/a/b/c", Value: 1}},
		{{Op: "add", Path: "nope", Value: 1}},
		{{Op: "move", Path: "/a"}},
	} {
		if _, err := ApplyJSON([]byte(`{"a":1,"l":[1]}`), ops); err == nil {
			t.Errorf("%v: no error", ops)
		}
	}
}

// FuzzDiffApply: for any two JSON documents, applying the diff of a to b
// onto a gives b.
func FuzzDiffApply(f *testing.F) {
	f.Add(`{"c":[{"name":"a"},{"name":"b"}]}`, `{"c":[{"name":"s"},{"name":"a","e":[1]},{"name":"b"}]}`)
	f.Add(`[1,2,3]`, `[3]`)
	f.Add(`{"a":{"b":null}}`, `{"a":{"b":[]}}`)
	f.Fuzz(func(t *testing.T, a, b string) {
		if _, err := decodeJSON([]byte(a)); err != nil {
			return
		}
		if _, err := decodeJSON([]byte(b)); err != nil {
			return
		}
		roundTrip(t, a, b)
	})
}
