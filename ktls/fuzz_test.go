package ktls

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
)

// Post-handshake messages come from the peer split over records any way
// it likes: never a panic, never an unbounded buffer, and a stream of
// whole tickets is always accepted, however it is split.
func FuzzPostHandshake(f *testing.F) {
	f.Add([]byte{msgNewSessionTicket, 0, 0, 2, 9, 9}, uint8(3))
	f.Add([]byte{msgKeyUpdate, 0, 0, 1, 0}, uint8(1))
	f.Add([]byte{msgNewSessionTicket, 0xff, 0xff, 0xff}, uint8(2))
	f.Add([]byte{1, 0, 0, 0}, uint8(0))
	f.Fuzz(func(t *testing.T, data []byte, split uint8) {
		var buf []byte
		var err error
		for rest := data; len(rest) > 0 && err == nil; {
			k := min(len(rest), int(split)+1)
			buf, err = postHandshake(buf, rest[:k])
			rest = rest[k:]
			if len(buf) > 4+maxPostHandshakeMsg+len(data) {
				t.Fatalf("buffer grew to %d", len(buf))
			}
		}
		if err == nil && len(buf) > 0 && buf[0] != msgNewSessionTicket {
			t.Fatalf("kept a partial message of type %d", buf[0])
		}
		// Whole tickets, however split, leave nothing and no error.
		var tickets []byte
		for i, b := range data {
			tickets = append(tickets, msgNewSessionTicket, 0, 0, byte(i%4))
			tickets = append(tickets, bytes.Repeat([]byte{b}, i%4)...)
		}
		buf, err = nil, nil
		for rest := tickets; len(rest) > 0; {
			k := min(len(rest), int(split)+1)
			if buf, err = postHandshake(buf, rest[:k]); err != nil {
				t.Fatal(err)
			}
			rest = rest[k:]
		}
		if len(buf) != 0 {
			t.Fatalf("%d bytes left after whole tickets", len(buf))
		}
	})
}

// chunkConn returns its stream in reads of the sizes given (cycling), as
// TCP may.
type chunkConn struct {
	net.Conn
	data   []byte
	chunks []byte
	i      int
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	k := 1
	if len(c.chunks) > 0 {
		k = int(c.chunks[c.i%len(c.chunks)]) + 1
		c.i++
	}
	k = min(k, len(p), len(c.data))
	n := copy(p, c.data[:k])
	c.data = c.data[n:]
	return n, nil
}

// Whatever the record lengths and however TCP splits the stream, the cork
// returns the stream unchanged, never past the end of a record.
func FuzzCork(f *testing.F) {
	f.Add([]byte{22, 3, 3, 0, 2, 1, 2, 23, 3, 3, 0, 0}, []byte{0, 4})
	f.Add([]byte{22, 3, 3, 0xff, 0xff, 1}, []byte{200})
	f.Add([]byte{22, 3}, []byte{})
	f.Fuzz(func(t *testing.T, stream, chunks []byte) {
		c := newCork(&chunkConn{data: stream, chunks: chunks})
		var got []byte
		buf := make([]byte, 1000)
		pos := 0     // position in the stream
		recEnd := -1 // end of the current record (-1: in a header)
		for range 100000 {
			n, err := c.Read(buf)
			if n > 0 {
				// Record boundaries as the stream defines them.
				for i := 0; i < n; i++ {
					if recEnd < 0 || pos >= recEnd {
						if pos+5 > len(stream) {
							t.Fatalf("handed out a partial header at %d", pos)
						}
						recEnd = pos + 5 + int(binary.BigEndian.Uint16(stream[pos+3:pos+5]))
					}
					pos++
				}
				if pos > recEnd {
					t.Fatalf("a Read crossed a record end (%d > %d)", pos, recEnd)
				}
				got = append(got, buf[:n]...)
			}
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatal(err)
				}
				break
			}
		}
		if !bytes.Equal(got, stream[:len(got)]) {
			t.Fatal("the cork changed the stream")
		}
	})
}
