package main

import (
	"io"
	"strings"
	"testing"
)

// FuzzParseRunFlags parses arbitrary command lines for `ferry run`: every
// one is a config or a usage error, never a panic, and an accepted config
// satisfies the checks parseRunFlags promises.
func FuzzParseRunFlags(f *testing.F) {
	for _, s := range []string{
		"-proxy-id\x00web-sidecar-proxy",
		"-sidecar-for\x00web\x00-max-connections\x000\x00-virtual-cidr\x0010.96.0.0/12\x00-virtual-cidr\x00fd00::/108",
		"-proxy-id\x00x\x00-dns-recursor\x001.1.1.1:53\x00-dns-recursor\x00[::1]:5353\x00-log-level\x00trace",
		"-proxy-id\x00x\x00-connect-timeout\x00-1s",
		"-proxy-id\x00x\x00-default-intention-policy\x00maybe",
		"-proxy-id=x\x00-virtual-cidr=300.0.0.0/8\x00--tunnels=false",
		"-h", "", "-proxy-id", "--\x00-proxy-id\x00x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		var args []string
		if line != "" {
			args = strings.Split(line, "\x00")
		}
		c, err := parseRunFlags(args, io.Discard)
		if err != nil {
			return
		}
		switch {
		case (c.ProxyID == "") == (c.SidecarFor == ""):
			t.Fatalf("accepted %q with proxy-id %q and sidecar-for %q", args, c.ProxyID, c.SidecarFor)
		case c.MaxConnections < 0, c.ProxyUID < 0, c.ConnectTimeout <= 0, c.HandshakeTimeout <= 0, c.IdleTimeout < 0, c.DrainTimeout < 0:
			t.Fatalf("accepted %q with an out-of-range value: %+v", args, c)
		}
	})
}
