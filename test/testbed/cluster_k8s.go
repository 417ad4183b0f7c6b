package testbed

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// AuthMethod is a `jwt` ACL auth method whose signing key the test holds,
// standing in for consul-k8s's kubernetes auth method: a bearer token for a
// service logs in with that service's identity (binding rule: service
// identity ${value.service}, from the JWT's sub claim).
type AuthMethod struct {
	Name string
	key  *ecdsa.PrivateKey
}

const (
	jwtIssuer   = "ferry-testbed"
	jwtAudience = "consul"
)

// CreateAuthMethod creates the auth method and its binding rule.
func (c *Cluster) CreateAuthMethod(t testing.TB, name string) *AuthMethod {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pub := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	acl := c.Client.ACL()
	if _, _, err := acl.AuthMethodCreate(&api.ACLAuthMethod{
		Name: name,
		Type: "jwt",
		Config: map[string]any{
			"BoundIssuer":          jwtIssuer,
			"BoundAudiences":       []string{jwtAudience},
			"JWTValidationPubKeys": []string{pub},
			"ClaimMappings":        map[string]string{"sub": "service"},
		},
	}, nil); err != nil {
		t.Fatalf("testbed: create auth method: %v", err)
	}
	if _, _, err := acl.BindingRuleCreate(&api.ACLBindingRule{
		AuthMethod: name,
		BindType:   api.BindingRuleBindTypeService,
		BindName:   "${value.service}",
	}, nil); err != nil {
		t.Fatalf("testbed: create binding rule: %v", err)
	}
	return &AuthMethod{Name: name, key: key}
}

// Token returns a bearer token (ES256 JWT, valid for an hour) that logs in
// as service.
func (am *AuthMethod) Token(t testing.TB, service string) string {
	t.Helper()
	return am.token(t, service, time.Now().Add(time.Hour))
}

// ExpiredToken returns a bearer token for service that expired an hour ago.
func (am *AuthMethod) ExpiredToken(t testing.TB, service string) string {
	t.Helper()
	return am.token(t, service, time.Now().Add(-time.Hour))
}

func (am *AuthMethod) token(t testing.TB, service string, exp time.Time) string {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT"})
	claims, _ := json.Marshal(map[string]any{
		"sub": service, "iss": jwtIssuer, "aud": []string{jwtAudience},
		"iat": exp.Add(-2 * time.Hour).Unix(), "nbf": exp.Add(-2 * time.Hour).Unix(), "exp": exp.Unix(),
	})
	signing := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	h := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, am.key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	// JWS ES256: r and s as 32-byte big-endian each.
	sig := make([]byte, 64)
	fill(sig[:32], r)
	fill(sig[32:], s)
	return signing + "." + enc.EncodeToString(sig)
}

func fill(dst []byte, n *big.Int) { n.FillBytes(dst) }

// K8sService is a pod's service as consul-k8s's endpoints controller
// registers it in the catalog (no agent): the service and its
// transparent-mode sidecar on the synthetic node <Node>-virtual.
type K8sService struct {
	Name string
	Pod  *Pod
	// Node is the Kubernetes node name; the Consul node is Node-virtual.
	Node string
	// Port is the app's port (connect-service-port).
	Port int
	// ClusterIP, when valid with ClusterPort, is the `virtual` tagged
	// address (the k8s Service's ClusterIP).
	ClusterIP   string
	ClusterPort int
	Upstreams   []api.Upstream
	ProxyConfig map[string]any
	// UID is the pod's UID (meta pod-uid).
	UID string
}

// K8sRegistered names what RegisterK8s created.
type K8sRegistered struct{ Node, ID, ProxyID string }

// RegisterK8s registers s like consul-k8s's endpoints controller
// (`PUT /v1/catalog/register` twice, with SkipNodeUpdate) and deregisters
// it at cleanup.
func (c *Cluster) RegisterK8s(t testing.TB, s K8sService) K8sRegistered {
	t.Helper()
	if s.Node == "" {
		s.Node = "node1"
	}
	if s.UID == "" {
		s.UID = uuid()
	}
	r := K8sRegistered{Node: s.Node + "-virtual", ID: s.Pod.Name + "-" + s.Name}
	r.ProxyID = r.ID + "-sidecar-proxy"
	meta := map[string]string{
		"pod-name": s.Pod.Name, "k8s-service-name": s.Name, "k8s-namespace": "default",
		"managed-by": "consul-k8s-endpoints-controller", "pod-uid": s.UID, "synthetic-node": "true",
	}
	var tagged map[string]api.ServiceAddress
	if s.ClusterIP != "" {
		tagged = map[string]api.ServiceAddress{"virtual": {Address: s.ClusterIP, Port: s.ClusterPort}}
	}
	check := func(id string) *api.AgentCheck {
		return &api.AgentCheck{CheckID: "default/" + id, Name: "Kubernetes Readiness Check",
			Type: "kubernetes-readiness", Status: api.HealthPassing, ServiceID: id,
			Output: "Kubernetes health checks passing"}
	}
	node := func() *api.CatalogRegistration {
		return &api.CatalogRegistration{Node: r.Node, Address: s.Pod.IP.String(),
			NodeMeta: map[string]string{"synthetic-node": "true"}, SkipNodeUpdate: true}
	}
	svc := node()
	svc.Service = &api.AgentService{ID: r.ID, Service: s.Name, Port: s.Port, Address: s.Pod.IP.String(),
		Meta: meta, TaggedAddresses: tagged}
	svc.Check = check(r.ID)
	px := node()
	px.Service = &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: r.ProxyID, Service: s.Name + "-sidecar-proxy",
		Port: 20000, Address: s.Pod.IP.String(), Meta: meta, TaggedAddresses: tagged,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: s.Name, DestinationServiceID: r.ID,
			LocalServiceAddress: "127.0.0.1", LocalServicePort: s.Port,
			Mode: api.ProxyModeTransparent, Config: s.ProxyConfig, Upstreams: s.Upstreams,
		}}
	px.Check = check(r.ProxyID)
	for _, reg := range []*api.CatalogRegistration{svc, px} {
		if _, err := c.Client.Catalog().Register(reg, nil); err != nil {
			t.Fatalf("testbed: catalog register %s: %v", reg.Service.ID, err)
		}
	}
	t.Cleanup(func() {
		for _, id := range []string{r.ProxyID, r.ID} {
			c.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: r.Node, ServiceID: id}, nil)
		}
	})
	return r
}

// VirtualIP returns the Consul-assigned virtual IP of service (its sidecar
// must be registered), waiting up to 10 s.
func (c *Cluster) VirtualIP(t testing.TB, service string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		entries, _, err := c.Client.Catalog().Connect(service, "", nil)
		if err == nil {
			for _, e := range entries {
				if a, ok := e.ServiceTaggedAddresses["consul-virtual"]; ok && a.Address != "" {
					return a.Address
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("testbed: %s has no consul-virtual address: %v", service, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// SetIntention writes the service-intentions entry of dest with one
// source and action (allow or deny).
func (c *Cluster) SetIntention(t testing.TB, source, dest string, action api.IntentionAction) {
	t.Helper()
	if _, _, err := c.Client.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: dest,
		Sources: []*api.SourceIntention{{Name: source, Action: action}},
	}, nil); err != nil {
		t.Fatalf("testbed: intention %s -> %s: %v", source, dest, err)
	}
}

// String names the registration for logs.
func (r K8sRegistered) String() string { return fmt.Sprintf("%s/%s", r.Node, r.ProxyID) }
