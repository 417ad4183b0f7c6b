package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// The patch is computed here rather than with a JSON-patch library: ferry
// needs both directions (a patch for the webhook, and applying that patch
// to a manifest's untyped document so fields the API types do not know
// survive), the documents are small, and arrays of named items (containers,
// volumes, env) are aligned by name so that a sidecar put first in
// containers is one "add" rather than a rewrite of every container.

// Op is one RFC 6902 operation; only add, remove and replace are produced.
type Op struct {
	Op    string
	Path  string
	Value any
}

func (o Op) MarshalJSON() ([]byte, error) {
	if o.Op == "remove" {
		return json.Marshal(struct {
			Op   string `json:"op"`
			Path string `json:"path"`
		}{o.Op, o.Path})
	}
	return json.Marshal(struct {
		Op    string `json:"op"`
		Path  string `json:"path"`
		Value any    `json:"value"`
	}{o.Op, o.Path, o.Value})
}

// decodeJSON decodes with json.Number so that integers beyond 2^53 (and
// the exact spelling of numbers) survive a round trip.
func decodeJSON(b []byte) (any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, err
	}
	if d.More() {
		return nil, fmt.Errorf("trailing data after the JSON value")
	}
	return v, nil
}

// DiffJSON returns the operations that turn document a into document b.
func DiffJSON(a, b []byte) ([]Op, error) {
	va, err := decodeJSON(a)
	if err != nil {
		return nil, fmt.Errorf("inject: diff: first document: %w", err)
	}
	vb, err := decodeJSON(b)
	if err != nil {
		return nil, fmt.Errorf("inject: diff: second document: %w", err)
	}
	var ops []Op
	diff("", va, vb, &ops)
	return ops, nil
}

func escape(tok string) string {
	return strings.ReplaceAll(strings.ReplaceAll(tok, "~", "~0"), "/", "~1")
}

func diff(path string, a, b any, ops *[]Op) {
	if reflect.DeepEqual(a, b) {
		return
	}
	switch av := a.(type) {
	case map[string]any:
		if bv, ok := b.(map[string]any); ok {
			diffObject(path, av, bv, ops)
			return
		}
	case []any:
		if bv, ok := b.([]any); ok {
			diffArray(path, av, bv, ops)
			return
		}
	}
	*ops = append(*ops, Op{Op: "replace", Path: path, Value: b})
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func diffObject(path string, a, b map[string]any, ops *[]Op) {
	for _, k := range sortedKeys(a) {
		if _, ok := b[k]; !ok {
			*ops = append(*ops, Op{Op: "remove", Path: path + "/" + escape(k)})
		}
	}
	for _, k := range sortedKeys(b) {
		if av, ok := a[k]; ok {
			diff(path+"/"+escape(k), av, b[k], ops)
		} else {
			*ops = append(*ops, Op{Op: "add", Path: path + "/" + escape(k), Value: b[k]})
		}
	}
}

// names returns each element's "name" when every element is an object with
// a distinct string name.
func names(xs []any) ([]string, bool) {
	out := make([]string, len(xs))
	seen := map[string]bool{}
	for i, x := range xs {
		m, ok := x.(map[string]any)
		if !ok {
			return nil, false
		}
		n, ok := m["name"].(string)
		if !ok || seen[n] {
			return nil, false
		}
		seen[n] = true
		out[i] = n
	}
	return out, true
}

func diffArray(path string, a, b []any, ops *[]Op) {
	if diffNamed(path, a, b, ops) {
		return
	}
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		diff(path+"/"+strconv.Itoa(i), a[i], b[i], ops)
	}
	for i := len(a) - 1; i >= len(b); i-- {
		*ops = append(*ops, Op{Op: "remove", Path: path + "/" + strconv.Itoa(i)})
	}
	for i := len(a); i < len(b); i++ {
		*ops = append(*ops, Op{Op: "add", Path: path + "/" + strconv.Itoa(i), Value: b[i]})
	}
}

// diffNamed aligns two arrays of named objects by name: removals from the
// end, then the kept elements in place, then insertions in b's order. It
// declines (false) when the elements are not all named or the kept ones
// changed their relative order.
func diffNamed(path string, a, b []any, ops *[]Op) bool {
	an, ok := names(a)
	if !ok {
		return false
	}
	bn, ok := names(b)
	if !ok {
		return false
	}
	bIndex := map[string]int{}
	for i, n := range bn {
		bIndex[n] = i
	}
	last := -1
	for _, n := range an {
		if j, ok := bIndex[n]; ok {
			if j < last {
				return false
			}
			last = j
		}
	}
	var local []Op
	for i := len(an) - 1; i >= 0; i-- {
		if _, ok := bIndex[an[i]]; !ok {
			local = append(local, Op{Op: "remove", Path: path + "/" + strconv.Itoa(i)})
		}
	}
	aIndex := map[string]int{}
	cur := 0
	for i, n := range an {
		if _, ok := bIndex[n]; ok {
			aIndex[n] = i
			diff(path+"/"+strconv.Itoa(cur), a[i], b[bIndex[n]], &local)
			cur++
		}
	}
	for j, n := range bn {
		if _, ok := aIndex[n]; !ok {
			local = append(local, Op{Op: "add", Path: path + "/" + strconv.Itoa(j), Value: b[j]})
		}
	}
	*ops = append(*ops, local...)
	return true
}

// ApplyJSON applies ops to the JSON document doc and returns the result.
func ApplyJSON(doc []byte, ops []Op) ([]byte, error) {
	v, err := decodeJSON(doc)
	if err != nil {
		return nil, fmt.Errorf("inject: apply: %w", err)
	}
	if v, err = Apply(v, ops); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// Apply applies ops to an untyped JSON value (maps, slices, scalars) and
// returns the result; v's maps may be modified.
func Apply(v any, ops []Op) (any, error) {
	for _, op := range ops {
		var err error
		if v, err = applyOne(v, op); err != nil {
			return nil, fmt.Errorf("inject: apply %s %s: %w", op.Op, op.Path, err)
		}
	}
	return v, nil
}

func splitPath(p string) ([]string, error) {
	if p == "" {
		return nil, nil
	}
	if !strings.HasPrefix(p, "/") {
		return nil, fmt.Errorf("path does not start with /")
	}
	toks := strings.Split(p[1:], "/")
	for i, t := range toks {
		toks[i] = strings.ReplaceAll(strings.ReplaceAll(t, "~1", "/"), "~0", "~")
	}
	return toks, nil
}

func applyOne(root any, op Op) (any, error) {
	toks, err := splitPath(op.Path)
	if err != nil {
		return nil, err
	}
	if len(toks) == 0 {
		if op.Op == "remove" {
			return nil, fmt.Errorf("cannot remove the whole document")
		}
		return op.Value, nil
	}
	set, err := edit(root, toks, op)
	if err != nil {
		return nil, err
	}
	return set, nil
}

// edit returns container with op applied at the path toks below it.
func edit(container any, toks []string, op Op) (any, error) {
	tok := toks[0]
	switch c := container.(type) {
	case map[string]any:
		if len(toks) > 1 {
			child, ok := c[tok]
			if !ok {
				return nil, fmt.Errorf("no member %q", tok)
			}
			nc, err := edit(child, toks[1:], op)
			if err != nil {
				return nil, err
			}
			c[tok] = nc
			return c, nil
		}
		_, exists := c[tok]
		switch op.Op {
		case "add":
			c[tok] = op.Value
		case "replace":
			if !exists {
				return nil, fmt.Errorf("no member %q to replace", tok)
			}
			c[tok] = op.Value
		case "remove":
			if !exists {
				return nil, fmt.Errorf("no member %q to remove", tok)
			}
			delete(c, tok)
		default:
			return nil, fmt.Errorf("unsupported operation")
		}
		return c, nil
	case []any:
		if len(toks) == 1 && op.Op == "add" && tok == "-" {
			return append(c, op.Value), nil
		}
		i, err := strconv.Atoi(tok)
		if err != nil || i < 0 || i > len(c) || (i == len(c) && (len(toks) > 1 || op.Op != "add")) {
			return nil, fmt.Errorf("index %q out of range (length %d)", tok, len(c))
		}
		if len(toks) > 1 {
			nc, err := edit(c[i], toks[1:], op)
			if err != nil {
				return nil, err
			}
			c[i] = nc
			return c, nil
		}
		switch op.Op {
		case "add":
			c = append(c, nil)
			copy(c[i+1:], c[i:])
			c[i] = op.Value
		case "replace":
			c[i] = op.Value
		case "remove":
			c = append(c[:i], c[i+1:]...)
		default:
			return nil, fmt.Errorf("unsupported operation")
		}
		return c, nil
	default:
		return nil, fmt.Errorf("%q is below a scalar", tok)
	}
}
