package inject

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
)

// In-cluster credentials, as every pod gets them.
const (
	InClusterTokenFile = serviceAccountTokenDir + "/token"
	InClusterCAFile    = serviceAccountTokenDir + "/ca.crt"
)

// InClusterServer is the API server URL from the environment the kubelet
// gives every pod; empty outside a cluster.
func InClusterServer() string {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return ""
	}
	return "https://" + net.JoinHostPort(host, port)
}

// KubeNamespaces reads namespace labels from the API server at server
// (https URL), verified with the CA in caFile, with the bearer token in
// tokenFile, read on every call because projected tokens rotate. It needs
// only "get" on namespaces.
func KubeNamespaces(server, tokenFile, caFile string) (NamespaceLabels, error) {
	u, err := url.Parse(server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("inject: API server %q is not an https URL", server)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("inject: API server CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("inject: API server CA %s: no PEM certificate", caFile)
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		Proxy:           nil,
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
	}}
	base := strings.TrimSuffix(server, "/")
	return func(ctx context.Context, name string) (map[string]string, error) {
		tok, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, fmt.Errorf("API token: %w", err)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v1/namespaces/"+url.PathEscape(name), nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		req.Header.Set("Accept", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET namespace %s: %s: %s", name, resp.Status, strings.TrimSpace(string(body)))
		}
		var ns corev1.Namespace
		if err := kjson.UnmarshalCaseSensitivePreserveInts(body, &ns); err != nil {
			return nil, fmt.Errorf("GET namespace %s: %w", name, err)
		}
		return ns.Labels, nil
	}, nil
}
