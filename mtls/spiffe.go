package mtls

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// SpiffeID is a Consul service identity:
// spiffe://<TrustDomain>[/ap/<Partition>]/ns/<Namespace>/dc/<Datacenter>/svc/<Service>.
//
// Partition "" and "default" mean the same thing; String emits the /ap/
// segment only for other partitions, as Consul does, so a parsed ID prints
// back to the string Consul puts in its certificates.
type SpiffeID struct {
	TrustDomain string
	Partition   string
	Namespace   string
	Datacenter  string
	Service     string
}

// ServiceID returns the identity Consul issues to service in the given
// trust domain and datacenter (default namespace and partition).
func ServiceID(trustDomain, datacenter, service string) SpiffeID {
	return SpiffeID{TrustDomain: trustDomain, Partition: "default", Namespace: "default", Datacenter: datacenter, Service: service}
}

// ParseSpiffeID parses a service SPIFFE ID from its string form.
func ParseSpiffeID(s string) (SpiffeID, error) {
	u, err := url.Parse(s)
	if err != nil {
		return SpiffeID{}, fmt.Errorf("mtls: parse SPIFFE ID %q: %w", s, err)
	}
	return SpiffeIDFromURL(u)
}

// SpiffeIDFromURL parses a service SPIFFE ID from a certificate URI SAN.
// Path components may be URL-escaped. A missing /ap/ segment means the
// default partition; a missing namespace is an error (Consul always emits it).
func SpiffeIDFromURL(u *url.URL) (SpiffeID, error) {
	if u == nil {
		return SpiffeID{}, errors.New("mtls: parse SPIFFE ID: nil URL")
	}
	id, err := spiffeIDFromURL(u)
	if err != nil {
		return SpiffeID{}, fmt.Errorf("mtls: parse SPIFFE ID %q: %w", u.String(), err)
	}
	return id, nil
}

func spiffeIDFromURL(u *url.URL) (SpiffeID, error) {
	if !strings.EqualFold(u.Scheme, "spiffe") {
		return SpiffeID{}, fmt.Errorf("scheme %q is not spiffe", u.Scheme)
	}
	if u.Opaque != "" {
		return SpiffeID{}, errors.New("not a hierarchical URI (want spiffe://trust-domain/...)")
	}
	if u.Host == "" {
		return SpiffeID{}, errors.New("empty trust domain")
	}
	if u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Port() != "" {
		return SpiffeID{}, errors.New("user info, port, query or fragment not allowed")
	}
	// Split the escaped path so an escaped "/" inside a component stays inside it.
	raw := u.EscapedPath()
	if !strings.HasPrefix(raw, "/") {
		return SpiffeID{}, errors.New("empty path: not a service identity")
	}
	parts := strings.Split(raw[1:], "/")
	for i, p := range parts {
		v, err := url.PathUnescape(p)
		if err != nil {
			return SpiffeID{}, fmt.Errorf("path component %d: %w", i, err)
		}
		parts[i] = v
	}
	id := SpiffeID{TrustDomain: u.Host, Partition: "default"}
	if len(parts) == 8 && parts[0] == "ap" {
		id.Partition = parts[1]
		parts = parts[2:]
	}
	if len(parts) != 6 || parts[0] != "ns" || parts[2] != "dc" || parts[4] != "svc" {
		return SpiffeID{}, errors.New("not a service identity (want [/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>)")
	}
	id.Namespace, id.Datacenter, id.Service = parts[1], parts[3], parts[5]
	for _, f := range []struct{ name, v string }{
		{"partition", id.Partition}, {"namespace", id.Namespace}, {"datacenter", id.Datacenter}, {"service", id.Service},
	} {
		if f.v == "" {
			return SpiffeID{}, fmt.Errorf("empty %s", f.name)
		}
	}
	return id, nil
}

// URL returns the identity as a URL. Components are path-escaped (an "/"
// inside one becomes %2F) so the result always parses back to id.
func (id SpiffeID) URL() *url.URL {
	ns := id.Namespace
	if ns == "" {
		ns = "default"
	}
	segs := []string{"ns", ns, "dc", id.Datacenter, "svc", id.Service}
	if ap := strings.ToLower(id.Partition); ap != "" && ap != "default" {
		segs = append([]string{"ap", ap}, segs...)
	}
	var p, raw strings.Builder
	for _, s := range segs {
		p.WriteString("/" + s)
		raw.WriteString("/" + url.PathEscape(s))
	}
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: p.String(), RawPath: raw.String()}
}

// String returns the canonical URI form, the exact string a Consul leaf
// carries as its URI SAN.
func (id SpiffeID) String() string { return id.URL().String() }

// IsZero reports whether id is the zero value.
func (id SpiffeID) IsZero() bool { return id == SpiffeID{} }

// SNI returns the TLS server name Consul-configured proxies send when
// dialing this service (see ServiceSNI).
func (id SpiffeID) SNI() string {
	return ServiceSNI(id.Service, id.Namespace, id.Partition, id.Datacenter, id.TrustDomain)
}

// ServiceSNI is Consul's connect.ServiceSNI without a subset:
// <service>.<ns>.<dc>.internal.<td> for the default partition and
// <service>.<ns>.<partition>.<dc>.internal-v1.<td> otherwise.
func ServiceSNI(service, namespace, partition, datacenter, trustDomain string) string {
	if namespace == "" {
		namespace = "default"
	}
	if partition == "" || strings.EqualFold(partition, "default") {
		return service + "." + namespace + "." + datacenter + ".internal." + trustDomain
	}
	return service + "." + namespace + "." + partition + "." + datacenter + ".internal-v1." + trustDomain
}

// matchLenient is the comparison Consul's built-in proxy applies to the
// server it dialed: the trust domain is ignored (x509 trust already
// covers it) and the rest is compared case-insensitively.
func matchLenient(expected, got SpiffeID) bool {
	norm := func(id SpiffeID) string {
		id.TrustDomain = ""
		if id.Partition == "" {
			id.Partition = "default"
		}
		if id.Namespace == "" {
			id.Namespace = "default"
		}
		return id.String()
	}
	return strings.EqualFold(norm(expected), norm(got))
}
