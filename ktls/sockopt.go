package ktls

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// control runs f on the socket's fd.
func control(rc syscall.RawConn, f func(fd int) error) error {
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func setULP(fd int) error {
	if err := unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls"); err != nil {
		return fmt.Errorf("setsockopt TCP_ULP tls: %w", err)
	}
	return nil
}

func setCrypto(fd, dir int, info []byte) error {
	if err := unix.SetsockoptString(fd, solTLS, dir, string(info)); err != nil {
		return fmt.Errorf("setsockopt %s: %w", dirName(dir), err)
	}
	return nil
}

func dirName(dir int) string {
	if dir == tlsTX {
		return "TLS_TX"
	}
	return "TLS_RX"
}

// getCrypto reads a direction's crypto_info back (the kernel fills in
// the current rec_seq). The kernel wants the exact size of the cipher's
// struct, so the header comes first.
func getCrypto(fd, dir int) ([]byte, error) {
	hdr, err := getsockopt(fd, dir, cryptoInfoHdrSize)
	if err != nil {
		return nil, err
	}
	size := cryptoInfoHdrSize + aesGCMIVSize + 16 + aesGCMSaltSize + recSeqSize
	switch binary.NativeEndian.Uint16(hdr[2:]) {
	case cipherAESGCM128:
	case cipherAESGCM256:
		size += 16
	default:
		return nil, fmt.Errorf("getsockopt %s: cipher type %d", dirName(dir), binary.NativeEndian.Uint16(hdr[2:]))
	}
	return getsockopt(fd, dir, size)
}

func getsockopt(fd, dir, size int) ([]byte, error) {
	buf := make([]byte, size)
	n := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), solTLS, uintptr(dir),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	if e != 0 {
		return nil, fmt.Errorf("getsockopt %s: %w", dirName(dir), e)
	}
	return buf[:n], nil
}

// recordTypeCmsg builds the cmsg that sets the type of the record sendmsg
// writes.
func recordTypeCmsg(typ byte) []byte {
	b := make([]byte, unix.CmsgSpace(1))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = solTLS
	h.Type = tlsSetRecordType
	h.SetLen(unix.CmsgLen(1))
	b[unix.CmsgLen(0)] = typ
	return b
}

// recordTypeOf returns the record type a recvmsg reported in its cmsgs.
func recordTypeOf(oob []byte) (byte, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0, fmt.Errorf("parse cmsg: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Level == solTLS && m.Header.Type == tlsGetRecordType && len(m.Data) >= 1 {
			return m.Data[0], nil
		}
	}
	return 0, fmt.Errorf("recvmsg on a kTLS socket returned no record type")
}

func setNoPad(fd int) error {
	return unix.SetsockoptInt(fd, solTLS, tlsRXExpectNoPad, 1)
}
