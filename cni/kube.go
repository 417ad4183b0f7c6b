package cni

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Why not client-go: the plugin makes one GET per pod sandbox. client-go's
// clientcmd and clientset would add a few dozen modules and ~15 MB to a
// binary that also runs as the sidecar, for a kubeconfig subset that fits in
// one struct: the one the installer writes (and consul-k8s's installer
// writes), server, CA, bearer token or token file, optional client cert.
// The response is decoded into k8s.io/api's Pod, so the shape is the API's.

// Kubeconfig is the subset of a kubeconfig file ferry-cni understands.
type Kubeconfig struct {
	APIVersion     string         `json:"apiVersion,omitempty"`
	Kind           string         `json:"kind,omitempty"`
	CurrentContext string         `json:"current-context,omitempty"`
	Clusters       []NamedCluster `json:"clusters"`
	Users          []NamedUser    `json:"users"`
	Contexts       []NamedContext `json:"contexts"`
}

// NamedCluster is a kubeconfig clusters[] entry.
type NamedCluster struct {
	Name    string  `json:"name"`
	Cluster Cluster `json:"cluster"`
}

// Cluster is an API server endpoint and how to trust it.
type Cluster struct {
	Server                   string `json:"server"`
	CertificateAuthority     string `json:"certificate-authority,omitempty"`
	CertificateAuthorityData string `json:"certificate-authority-data,omitempty"`
	TLSServerName            string `json:"tls-server-name,omitempty"`
	InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify,omitempty"`
}

// NamedUser is a kubeconfig users[] entry.
type NamedUser struct {
	Name string   `json:"name"`
	User AuthInfo `json:"user"`
}

// AuthInfo is how the plugin authenticates.
type AuthInfo struct {
	Token                 string `json:"token,omitempty"`
	TokenFile             string `json:"tokenFile,omitempty"`
	ClientCertificate     string `json:"client-certificate,omitempty"`
	ClientCertificateData string `json:"client-certificate-data,omitempty"`
	ClientKey             string `json:"client-key,omitempty"`
	ClientKeyData         string `json:"client-key-data,omitempty"`
}

// NamedContext is a kubeconfig contexts[] entry.
type NamedContext struct {
	Name    string  `json:"name"`
	Context Context `json:"context"`
}

// Context pairs a cluster with a user.
type Context struct {
	Cluster string `json:"cluster"`
	User    string `json:"user"`
}

// PodClient reads pods from one API server.
type PodClient struct {
	server    *url.URL
	http      *http.Client
	token     string
	tokenFile string
}

// LoadKubeconfig reads path and returns a client for its current context
// (or its only context). Relative file references resolve against the
// kubeconfig's directory, as kubectl does.
func LoadKubeconfig(path string) (*PodClient, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	var kc Kubeconfig
	if err := yaml.UnmarshalStrict(data, &kc); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return kc.client(filepath.Dir(path))
}

func (kc *Kubeconfig) client(dir string) (*PodClient, error) {
	ctxName := kc.CurrentContext
	if ctxName == "" && len(kc.Contexts) == 1 {
		ctxName = kc.Contexts[0].Name
	}
	var ctx *Context
	for i := range kc.Contexts {
		if kc.Contexts[i].Name == ctxName {
			ctx = &kc.Contexts[i].Context
		}
	}
	if ctx == nil {
		return nil, fmt.Errorf("kubeconfig: context %q not found", ctxName)
	}
	var cl *Cluster
	for i := range kc.Clusters {
		if kc.Clusters[i].Name == ctx.Cluster {
			cl = &kc.Clusters[i].Cluster
		}
	}
	if cl == nil {
		return nil, fmt.Errorf("kubeconfig: cluster %q not found", ctx.Cluster)
	}
	var user AuthInfo
	if ctx.User != "" {
		found := false
		for i := range kc.Users {
			if kc.Users[i].Name == ctx.User {
				user, found = kc.Users[i].User, true
			}
		}
		if !found {
			return nil, fmt.Errorf("kubeconfig: user %q not found", ctx.User)
		}
	}
	u, err := url.Parse(cl.Server)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("kubeconfig: server %q is not an http(s) URL", cl.Server)
	}
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cl.TLSServerName, InsecureSkipVerify: cl.InsecureSkipTLSVerify}
	ca, err := fileOrData(abs(cl.CertificateAuthority), cl.CertificateAuthorityData, "certificate-authority")
	if err != nil {
		return nil, err
	}
	if ca != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, errors.New("kubeconfig: certificate-authority holds no PEM certificate")
		}
		tc.RootCAs = pool
	}
	cert, err := fileOrData(abs(user.ClientCertificate), user.ClientCertificateData, "client-certificate")
	if err != nil {
		return nil, err
	}
	key, err := fileOrData(abs(user.ClientKey), user.ClientKeyData, "client-key")
	if err != nil {
		return nil, err
	}
	if (cert == nil) != (key == nil) {
		return nil, errors.New("kubeconfig: client-certificate and client-key go together")
	}
	if cert != nil {
		pair, err := tls.X509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{pair}
	}
	if user.Token != "" && user.TokenFile != "" {
		return nil, errors.New("kubeconfig: token and tokenFile are exclusive")
	}
	tr := &http.Transport{TLSClientConfig: tc, Proxy: nil, ForceAttemptHTTP2: true}
	return &PodClient{
		server:    u,
		http:      &http.Client{Transport: tr, Timeout: 15 * time.Second},
		token:     user.Token,
		tokenFile: abs(user.TokenFile),
	}, nil
}

func fileOrData(path, data, field string) ([]byte, error) {
	switch {
	case path != "" && data != "":
		return nil, fmt.Errorf("kubeconfig: %s and %s-data are exclusive", field, field)
	case data != "":
		b, err := base64.StdEncoding.DecodeString(data)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: %s-data is not base64: %w", field, err)
		}
		return b, nil
	case path != "":
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: %s: %w", field, err)
		}
		return b, nil
	}
	return nil, nil
}

// ErrPodNotFound is returned by Pod when the API server has no such pod.
var ErrPodNotFound = errors.New("pod not found")

// Pod GETs one pod. The token file is re-read on every call, so a rotated
// token is picked up without restarting anything.
func (c *PodClient) Pod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	if namespace == "" || name == "" {
		return nil, errors.New("pod namespace and name are required")
	}
	u := *c.server
	u.Path = strings.TrimSuffix(u.Path, "/") + "/api/v1/namespaces/" + url.PathEscape(namespace) + "/pods/" + url.PathEscape(name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "ferry-cni")
	token := c.token
	if c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig tokenFile: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: read response: %w", namespace, name, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, ErrPodNotFound)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("get pod %s/%s: %s: %s", namespace, name, resp.Status, strings.TrimSpace(string(body)))
	}
	var pod corev1.Pod
	if err := json.Unmarshal(body, &pod); err != nil {
		return nil, fmt.Errorf("get pod %s/%s: decode: %w", namespace, name, err)
	}
	return &pod, nil
}
