package ktls

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"sync"
)

// The kernel's UAPI constants (include/uapi/linux/tls.h).
const (
	solTLS             = 282 // SOL_TLS
	tlsTX              = 1   // TLS_TX
	tlsRX              = 2   // TLS_RX
	tlsRXExpectNoPad   = 4   // TLS_RX_EXPECT_NO_PAD (6.0+)
	tlsSetRecordType   = 1   // TLS_SET_RECORD_TYPE (cmsg)
	tlsGetRecordType   = 2   // TLS_GET_RECORD_TYPE (cmsg)
	tls13Version       = 0x0304
	cipherAESGCM128    = 51
	cipherAESGCM256    = 52
	aesGCMIVSize       = 8 // the explicit part; the kernel calls the implicit 4 bytes the salt
	aesGCMSaltSize     = 4
	recSeqSize         = 8
	cryptoInfoHdrSize  = 4
	cryptoInfoMaxBytes = cryptoInfoHdrSize + aesGCMIVSize + 32 + aesGCMSaltSize + recSeqSize
)

// TLS record content types (RFC 8446 5.1).
const (
	recordChangeCipherSpec = 20
	recordAlert            = 21
	recordHandshake        = 22
	recordApplicationData  = 23
)

// suite describes a TLS 1.3 cipher suite the kernel can run.
type suite struct {
	cipherType uint16
	keyLen     int
	hash       func() hash.Hash
}

// suiteFor returns the kernel parameters of a negotiated TLS 1.3 suite:
// AES-GCM only (ChaCha20-Poly1305 needs kernel 5.11 and a module ferry
// does not ask nodes to load; Go peers never pick it on hardware with AES).
func suiteFor(id uint16) (suite, error) {
	switch id {
	case tls.TLS_AES_128_GCM_SHA256:
		return suite{cipherAESGCM128, 16, sha256New}, nil
	case tls.TLS_AES_256_GCM_SHA384:
		return suite{cipherAESGCM256, 32, sha384New}, nil
	}
	return suite{}, fmt.Errorf("cipher suite %s is not offloadable (AES-GCM only)", tls.CipherSuiteName(id))
}

func sha256New() hash.Hash { return sha256.New() }
func sha384New() hash.Hash { return sha512.New384() }

// expandLabel is HKDF-Expand-Label (RFC 8446 7.1) with an empty context.
func expandLabel(h func() hash.Hash, secret []byte, label string, length int) ([]byte, error) {
	full := "tls13 " + label
	info := make([]byte, 0, 2+1+len(full)+1)
	info = binary.BigEndian.AppendUint16(info, uint16(length))
	info = append(info, byte(len(full)))
	info = append(info, full...)
	info = append(info, 0) // empty context
	return hkdf.Expand(h, secret, string(info), length)
}

// trafficKeys derives the record key and IV (RFC 8446 7.3) of a traffic
// secret.
func trafficKeys(s suite, secret []byte) (key, iv []byte, err error) {
	if key, err = expandLabel(s.hash, secret, "key", s.keyLen); err != nil {
		return nil, nil, fmt.Errorf("derive key: %w", err)
	}
	if iv, err = expandLabel(s.hash, secret, "iv", aesGCMIVSize+aesGCMSaltSize); err != nil {
		return nil, nil, fmt.Errorf("derive iv: %w", err)
	}
	return key, iv, nil
}

// cryptoInfo builds struct tls12_crypto_info_aes_gcm_{128,256}: version,
// cipher type, iv (the last 8 bytes of the TLS 1.3 IV), key, salt (its
// first 4 bytes), rec_seq (big endian), host byte order for the u16s. The
// kernel's nonce is salt‖iv XOR seq, which is RFC 8446's IV XOR seq.
func cryptoInfo(s suite, key, iv []byte, seq uint64) []byte {
	b := make([]byte, 0, cryptoInfoMaxBytes)
	b = binary.NativeEndian.AppendUint16(b, tls13Version)
	b = binary.NativeEndian.AppendUint16(b, s.cipherType)
	b = append(b, iv[aesGCMSaltSize:]...)
	b = append(b, key...)
	b = append(b, iv[:aesGCMSaltSize]...)
	b = binary.BigEndian.AppendUint64(b, seq)
	return b
}

// cryptoInfoSeq returns rec_seq of a crypto_info read back with
// getsockopt (the kernel's next record sequence number).
func cryptoInfoSeq(info []byte) (uint64, error) {
	if len(info) < cryptoInfoHdrSize+recSeqSize {
		return 0, fmt.Errorf("crypto_info of %d bytes", len(info))
	}
	return binary.BigEndian.Uint64(info[len(info)-recSeqSize:]), nil
}

// Key-log labels crypto/tls writes for the TLS 1.3 application traffic
// secrets (NSS key log format).
const (
	labelClientTraffic = "CLIENT_TRAFFIC_SECRET_0"
	labelServerTraffic = "SERVER_TRAFFIC_SECRET_0"
)

// secrets captures one connection's application traffic secrets from its
// tls.Config's KeyLogWriter. crypto/tls writes them before Handshake
// returns. Other lines (handshake secrets) are ignored; a second value
// for the same label (which would mean the writer is shared between
// connections) poisons the capture.
type secrets struct {
	mu             sync.Mutex
	random         []byte
	client, server []byte
	err            error
}

func (s *secrets) Write(line []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := bytes.Fields(line)
	if len(f) != 3 {
		s.fail(fmt.Errorf("malformed key log line"))
		return len(line), nil
	}
	var dst *[]byte
	switch string(f[0]) {
	case labelClientTraffic:
		dst = &s.client
	case labelServerTraffic:
		dst = &s.server
	default:
		return len(line), nil
	}
	random, err1 := hex.DecodeString(string(f[1]))
	secret, err2 := hex.DecodeString(string(f[2]))
	switch {
	case err1 != nil || err2 != nil:
		s.fail(errors.New("malformed key log hex"))
	case *dst != nil:
		s.fail(fmt.Errorf("%s logged twice: key log writer shared between connections", f[0]))
	case s.random != nil && !bytes.Equal(s.random, random):
		s.fail(errors.New("secrets of two handshakes in one key log"))
	default:
		s.random, *dst = random, secret
	}
	return len(line), nil
}

func (s *secrets) fail(err error) {
	if s.err == nil {
		s.err = err
	}
}

// get returns the client and server application traffic secrets.
func (s *secrets) get() (client, server []byte, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.err != nil:
		return nil, nil, s.err
	case s.client == nil || s.server == nil:
		return nil, nil, errors.New("application traffic secrets not logged (not TLS 1.3?)")
	}
	return s.client, s.server, nil
}

// wipe forgets the secrets once the kernel holds the keys.
func (s *secrets) wipe() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.client)
	clear(s.server)
	s.client, s.server = nil, nil
	s.fail(errors.New("secrets already used"))
}
