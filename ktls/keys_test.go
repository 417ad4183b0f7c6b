package ktls

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha512"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// RFC 8448 section 3 (Simple 1-RTT Handshake), TLS_AES_128_GCM_SHA256.
func TestTrafficKeysRFC8448(t *testing.T) {
	s, err := suiteFor(tls.TLS_AES_128_GCM_SHA256)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, secret, key, iv string }{
		{"server handshake",
			"b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38",
			"3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc",
			"5d 31 3e b2 67 12 76 ee 13 00 0b 30"},
		{"server application",
			"a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
			"9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56",
			"cf 78 2b 88 dd 83 54 9a ad f1 e9 84"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, iv, err := trafficKeys(s, unhex(t, tc.secret))
			if err != nil {
				t.Fatal(err)
			}
			if want := unhex(t, tc.key); !bytes.Equal(key, want) {
				t.Errorf("key %x, want %x", key, want)
			}
			if want := unhex(t, tc.iv); !bytes.Equal(iv, want) {
				t.Errorf("iv %x, want %x", iv, want)
			}
		})
	}
}

// RFC 8448 has no SHA-384 trace: check against HKDF-Expand-Label written
// out from its definition (one HMAC block: T(1) = HMAC(PRK, info || 1)).
func TestTrafficKeysSHA384(t *testing.T) {
	s, err := suiteFor(tls.TLS_AES_256_GCM_SHA384)
	if err != nil {
		t.Fatal(err)
	}
	secret := bytes.Repeat([]byte{0x42}, 48)
	key, iv, err := trafficKeys(s, secret)
	if err != nil {
		t.Fatal(err)
	}
	manual := func(label string, n int) []byte {
		info := binary.BigEndian.AppendUint16(nil, uint16(n))
		info = append(info, byte(len("tls13 "+label)))
		info = append(info, "tls13 "+label...)
		info = append(info, 0, 1) // empty context, then HKDF's counter
		m := hmac.New(sha512.New384, secret)
		m.Write(info)
		return m.Sum(nil)[:n]
	}
	if want := manual("key", 32); !bytes.Equal(key, want) {
		t.Errorf("key %x, want %x", key, want)
	}
	if want := manual("iv", 12); !bytes.Equal(iv, want) {
		t.Errorf("iv %x, want %x", iv, want)
	}
}

func TestSuiteFor(t *testing.T) {
	for _, tc := range []struct {
		id     uint16
		cipher uint16
		keyLen int
		ok     bool
	}{
		{tls.TLS_AES_128_GCM_SHA256, cipherAESGCM128, 16, true},
		{tls.TLS_AES_256_GCM_SHA384, cipherAESGCM256, 32, true},
		{tls.TLS_CHACHA20_POLY1305_SHA256, 0, 0, false},
		{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, 0, 0, false},
	} {
		s, err := suiteFor(tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tls.CipherSuiteName(tc.id), err, tc.ok)
			continue
		}
		if tc.ok && (s.cipherType != tc.cipher || s.keyLen != tc.keyLen) {
			t.Errorf("%s: %+v", tls.CipherSuiteName(tc.id), s)
		}
	}
}

// The layout of struct tls12_crypto_info_aes_gcm_{128,256}
// (include/uapi/linux/tls.h): u16 version, u16 cipher_type, iv[8],
// key[16|32], salt[4], rec_seq[8]; 40 and 56 bytes.
func TestCryptoInfoLayout(t *testing.T) {
	iv := unhex(t, "000102030405060708090a0b")
	for _, tc := range []struct {
		id   uint16
		size int
	}{{tls.TLS_AES_128_GCM_SHA256, 40}, {tls.TLS_AES_256_GCM_SHA384, 56}} {
		s, _ := suiteFor(tc.id)
		key := bytes.Repeat([]byte{0xee}, s.keyLen)
		b := cryptoInfo(s, key, iv, 0x0102030405060708)
		if len(b) != tc.size {
			t.Fatalf("%s: %d bytes, want %d", tls.CipherSuiteName(tc.id), len(b), tc.size)
		}
		if v := binary.NativeEndian.Uint16(b[0:]); v != 0x0304 {
			t.Errorf("version %#x", v)
		}
		if c := binary.NativeEndian.Uint16(b[2:]); c != s.cipherType {
			t.Errorf("cipher %d", c)
		}
		if got := b[4:12]; !bytes.Equal(got, iv[4:]) {
			t.Errorf("iv %x, want %x", got, iv[4:])
		}
		if got := b[12 : 12+s.keyLen]; !bytes.Equal(got, key) {
			t.Errorf("key %x", got)
		}
		if got := b[12+s.keyLen : 16+s.keyLen]; !bytes.Equal(got, iv[:4]) {
			t.Errorf("salt %x, want %x", got, iv[:4])
		}
		seq, err := cryptoInfoSeq(b)
		if err != nil || seq != 0x0102030405060708 {
			t.Errorf("rec_seq %#x %v", seq, err)
		}
		if got := b[16+s.keyLen:]; !bytes.Equal(got, unhex(t, "0102030405060708")) {
			t.Errorf("rec_seq bytes %x (big endian expected)", got)
		}
	}
}

func TestSecretsCapture(t *testing.T) {
	const random = "aabb"
	line := func(label, secret string) []byte { return []byte(label + " " + random + " " + secret + "\n") }
	t.Run("ok", func(t *testing.T) {
		var s secrets
		s.Write(line("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "0101"))
		s.Write(line(labelClientTraffic, "0a0b"))
		s.Write(line(labelServerTraffic, "0c0d"))
		c, sv, err := s.get()
		if err != nil || !bytes.Equal(c, []byte{10, 11}) || !bytes.Equal(sv, []byte{12, 13}) {
			t.Fatalf("%x %x %v", c, sv, err)
		}
		s.wipe()
		if _, _, err := s.get(); err == nil {
			t.Fatal("secrets usable after wipe")
		}
	})
	for name, lines := range map[string][][]byte{
		"missing server": {line(labelClientTraffic, "0a0b")},
		"shared writer":  {line(labelClientTraffic, "0a0b"), line(labelServerTraffic, "0c0d"), line(labelClientTraffic, "0e0f")},
		"two handshakes": {line(labelClientTraffic, "0a0b"), []byte(labelServerTraffic + " ccdd 0c0d\n")},
		"bad hex":        {line(labelClientTraffic, "zz"), line(labelServerTraffic, "0c0d")},
		"bad line":       {[]byte("garbage\n"), line(labelClientTraffic, "0a0b"), line(labelServerTraffic, "0c0d")},
	} {
		t.Run(name, func(t *testing.T) {
			var s secrets
			for _, l := range lines {
				if n, err := s.Write(l); n != len(l) || err != nil {
					t.Fatalf("Write: %d %v", n, err) // never fail crypto/tls's handshake
				}
			}
			if _, _, err := s.get(); err == nil {
				t.Fatal("get succeeded")
			}
		})
	}
}
