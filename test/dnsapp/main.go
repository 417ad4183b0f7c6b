// Command dnsapp is a test-only helper for the DNS end-to-end tests
// (test/e2e/dns_test.go); the server under test is `ferry run` itself.
//
//	dnsapp static -addr A -record NAME=IP... [-big NAME]
//	    a stand-in recursor: fixed A and AAAA records (a NAME may be given
//	    an IPv4 and an IPv6 address), NXDOMAIN otherwise; -big NAME
//	    answers with 100 A records, truncated over UDP.
//	dnsapp query [-tcp] -server A NAME TYPE
//	    prints the rcode, then one answer per line.
//	dnsapp garbage -server A -n N
//	    sends N malformed datagrams.
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dnsapp static|query|garbage ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "static":
		err = static(os.Args[2:])
	case "query":
		err = query(os.Args[2:])
	case "garbage":
		err = garbage(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dnsapp:", err)
		os.Exit(1)
	}
}

func static(args []string) error {
	fs := flag.NewFlagSet("static", flag.ExitOnError)
	addr := fs.String("addr", ":53", "listen address")
	big := fs.String("big", "", "name answered with 100 records (truncated over UDP)")
	var records multi
	fs.Var(&records, "record", "NAME=IP (repeatable)")
	_ = fs.Parse(args)
	table := map[string][]net.IP{}
	for _, r := range records {
		n, ip, ok := strings.Cut(r, "=")
		if !ok || net.ParseIP(ip) == nil {
			return fmt.Errorf("bad -record %q", r)
		}
		table[mdns.CanonicalName(n)] = append(table[mdns.CanonicalName(n)], net.ParseIP(ip))
	}
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		name := mdns.CanonicalName(q.Name)
		hdr := mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 30}
		_, tcp := w.RemoteAddr().(*net.TCPAddr)
		switch ip, ok := table[name]; {
		case *big != "" && name == mdns.CanonicalName(*big):
			if !tcp {
				m.Truncated = true
				break
			}
			for i := range 100 {
				m.Answer = append(m.Answer, &mdns.A{Hdr: hdr, A: net.IPv4(198, 18, 200, byte(i))})
			}
		case ok:
			for _, a := range ip {
				switch {
				case q.Qtype == mdns.TypeA && a.To4() != nil:
					m.Answer = append(m.Answer, &mdns.A{Hdr: hdr, A: a})
				case q.Qtype == mdns.TypeAAAA && a.To4() == nil:
					h := hdr
					h.Rrtype = mdns.TypeAAAA
					m.Answer = append(m.Answer, &mdns.AAAA{Hdr: h, AAAA: a})
				}
			}
		default:
			m.Rcode = mdns.RcodeNameError
			m.Ns = []mdns.RR{&mdns.SOA{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: 30},
				Ns: "ns.test.", Mbox: "h.test.", Serial: 1, Refresh: 1, Retry: 1, Expire: 1, Minttl: 30}}
		}
		fmt.Printf("query %s %s tcp=%v\n", q.Name, mdns.TypeToString[q.Qtype], tcp)
		_ = w.WriteMsg(m)
	})
	errc := make(chan error, 2)
	started := make(chan struct{}, 2)
	for _, netw := range []string{"udp", "tcp"} {
		s := &mdns.Server{Addr: *addr, Net: netw, Handler: h, NotifyStartedFunc: func() { started <- struct{}{} }}
		go func() { errc <- s.ListenAndServe() }()
	}
	for range 2 {
		select {
		case <-started:
		case err := <-errc:
			return err
		}
	}
	fmt.Println("ready", *addr)
	return <-errc
}

func query(args []string) error {
	fs := flag.NewFlagSet("query", flag.ExitOnError)
	server := fs.String("server", "127.0.0.1:53", "server")
	tcp := fs.Bool("tcp", false, "use TCP")
	_ = fs.Parse(args)
	if fs.NArg() != 2 {
		return fmt.Errorf("want NAME TYPE")
	}
	m := new(mdns.Msg).SetQuestion(mdns.Fqdn(fs.Arg(0)), mdns.StringToType[strings.ToUpper(fs.Arg(1))])
	c := &mdns.Client{Timeout: 5 * time.Second}
	if *tcp {
		c.Net = "tcp"
	}
	r, _, err := c.Exchange(m, *server)
	if err != nil {
		return err
	}
	fmt.Println(mdns.RcodeToString[r.Rcode])
	for _, rr := range r.Answer {
		fmt.Println(rr.String())
	}
	return nil
}

func garbage(args []string) error {
	fs := flag.NewFlagSet("garbage", flag.ExitOnError)
	server := fs.String("server", "127.0.0.1:53", "server")
	n := fs.Int("n", 5000, "datagrams")
	_ = fs.Parse(args)
	conn, err := net.Dial("udp", *server)
	if err != nil {
		return err
	}
	defer conn.Close()
	valid, _ := new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeA).Pack()
	for i := range *n {
		var b []byte
		switch i % 4 {
		case 0:
			b = make([]byte, rand.IntN(12))
		case 1:
			b = make([]byte, rand.IntN(1400))
			for j := range b {
				b[j] = byte(rand.Uint32())
			}
		case 2:
			b = append([]byte(nil), valid[:rand.IntN(len(valid))]...)
		case 3:
			b = append([]byte(nil), valid...)
			b[rand.IntN(len(b))] ^= byte(1 + rand.IntN(255))
		}
		_, _ = conn.Write(b) // refused/unreachable errors are expected
	}
	fmt.Println("sent", *n)
	return nil
}
