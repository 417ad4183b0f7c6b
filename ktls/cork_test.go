package ktls

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"
)

func record(typ byte, body []byte) []byte {
	b := []byte{typ, 3, 3, 0, 0}
	binary.BigEndian.PutUint16(b[3:], uint16(len(body)))
	return append(b, body...)
}

// The cork hands crypto/tls at most one record per Read and leaves
// whatever follows in the socket: the kernel must start on a boundary.
func TestCorkStopsAtRecordBoundary(t *testing.T) {
	for _, sizes := range [][]int{{1}, {0, 3}, {100, 16384 + 256, 7}, {16640, 16640}} {
		cl, sv := tcpPair(t)
		var wire []byte
		for i, n := range sizes {
			wire = append(wire, record(22, bytes.Repeat([]byte{byte(i + 1)}, n))...)
		}
		tail := []byte("application data the kernel must see")
		go func() { cl.Write(append(append([]byte{}, wire...), tail...)) }()

		c := newCork(sv)
		_ = sv.SetReadDeadline(time.Now().Add(10 * time.Second))
		var got []byte
		buf := make([]byte, 64<<10)
		for rec := range sizes {
			want := 5 + sizes[rec]
			var r []byte
			for len(r) < want {
				n, err := c.Read(buf)
				if err != nil {
					t.Fatalf("%v: record %d: %v", sizes, rec, err)
				}
				if len(r)+n > want {
					t.Fatalf("%v: record %d: a Read crossed the record's end (%d+%d > %d)", sizes, rec, len(r), n, want)
				}
				r = append(r, buf[:n]...)
			}
			got = append(got, r...)
		}
		if !bytes.Equal(got, wire) {
			t.Fatalf("%v: records read through the cork differ", sizes)
		}
		if !c.atBoundary() {
			t.Fatalf("%v: not at a boundary after whole records", sizes)
		}
		rest := make([]byte, len(tail))
		if _, err := io.ReadFull(sv, rest); err != nil || !bytes.Equal(rest, tail) {
			t.Fatalf("%v: the socket kept %q, %v; want %q", sizes, rest, err, tail)
		}
	}
}

func TestCorkReleaseFinishesRecordThenPassesThrough(t *testing.T) {
	cl, sv := tcpPair(t)
	wire := append(record(23, bytes.Repeat([]byte{1}, 10)), record(23, bytes.Repeat([]byte{2}, 10))...)
	wire = append(wire, record(23, bytes.Repeat([]byte{3}, 10))...)
	if _, err := cl.Write(wire); err != nil {
		t.Fatal(err)
	}
	c := newCork(sv)
	_ = sv.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1024)
	if n, err := c.Read(buf[:3]); n != 3 || err != nil { // mid-header
		t.Fatalf("%d %v", n, err)
	}
	c.release()
	if c.atBoundary() {
		t.Fatal("at a boundary in the middle of a header")
	}
	got := append([]byte{}, buf[:3]...)
	for len(got) < 15 { // the rest of record 1: never more while corked
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
		if len(got) > 15 {
			t.Fatalf("read past the record in progress after release: %d", len(got))
		}
	}
	for len(got) < len(wire) {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, wire) {
		t.Fatal("bytes differ")
	}
}

func TestCorkTruncatedHeader(t *testing.T) {
	cl, sv := tcpPair(t)
	cl.Write([]byte{22, 3})
	cl.CloseWrite()
	c := newCork(sv)
	_ = sv.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 100)
	var err error
	for err == nil {
		var n int
		n, err = c.Read(buf)
		if n != 0 {
			t.Fatalf("handed out %d bytes of an incomplete header", n)
		}
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("err %v, want io.ErrUnexpectedEOF", err)
	}
}
