package main

import (
	"io"
	"reflect"
	"strings"
	"testing"
)

// k8sArgs builds consul-k8s 1.x's consul-dataplane argument list
// (webhook/consul_dataplane_sidecar.go@v1.6.0, in its order) for the
// combination of TLS, ACLs, lifecycle, metrics merging and DNS.
func k8sArgs(tls, acls, lifecycle, metrics, dns bool) []string {
	a := []string{"-addresses", "consul-server.consul.svc", "-envoy-admin-bind-address=127.0.0.1",
		"-consul-dns-bind-addr=127.0.0.1", "-xds-bind-addr=127.0.0.1", "-grpc-port=8502",
		"-proxy-service-id-path=/consul/connect-inject/proxyid", "-log-level=info", "-log-json=false",
		"-envoy-concurrency=2", "-graceful-addr=127.0.0.1"}
	if acls {
		a = append(a, "-credential-type=login", "-login-auth-method=consul-k8s-auth-method",
			"-login-bearer-token-path=/var/run/secrets/kubernetes.io/serviceaccount/token")
	}
	if tls {
		a = append(a, "-tls-server-name=server.dc1.consul", "-ca-certs=/consul/connect-inject/consul-ca.pem")
	} else {
		a = append(a, "-tls-disabled")
	}
	a = append(a, "-graceful-port=20600")
	if lifecycle {
		a = append(a, "-shutdown-drain-listeners", "-shutdown-grace-period-seconds=30",
			"-graceful-shutdown-path=/graceful_shutdown", "-startup-grace-period-seconds=0",
			"-graceful-startup-path=/graceful_startup")
	}
	a = append(a, "-telemetry-prom-scrape-path=/metrics")
	if metrics {
		a = append(a, "-telemetry-prom-merge-port=20100",
			"-telemetry-prom-service-metrics-url=http://127.0.0.1:9102/metrics")
	}
	if dns {
		a = append(a, "-consul-dns-bind-port=8600")
	}
	return a
}

// k8sEnv is the sidecar's environment as the webhook sets it.
var k8sEnv = map[string]string{
	"TMPDIR":                    "/consul/connect-inject",
	"NODE_NAME":                 "node1",
	"DP_SERVICE_NODE_NAME":      "node1-virtual",
	"POD_NAME":                  "web-7d4b",
	"POD_NAMESPACE":             "default",
	"POD_UID":                   "0b7e1c7a",
	"DP_CREDENTIAL_LOGIN_META":  "pod=default/web-7d4b",
	"DP_CREDENTIAL_LOGIN_META1": "pod=default/web-7d4b",
	"DP_CREDENTIAL_LOGIN_META2": "pod-uid=0b7e1c7a",
}

func TestParseDataplaneConsulK8s(t *testing.T) {
	getenv := func(k string) string { return k8sEnv[k] }
	for _, tls := range []bool{false, true} {
		for _, acls := range []bool{false, true} {
			for _, lifecycle := range []bool{false, true} {
				for _, metrics := range []bool{false, true} {
					for _, dns := range []bool{false, true} {
						name := strings.Join([]string{on("tls", tls), on("acls", acls), on("lifecycle", lifecycle), on("metrics", metrics), on("dns", dns)}, ",")
						t.Run(name, func(t *testing.T) {
							c, dp, err := parseDataplane(k8sArgs(tls, acls, lifecycle, metrics, dns), getenv, io.Discard)
							if err != nil {
								t.Fatal(err)
							}
							a := c.Agentless
							want := agentlessConfig{
								Addresses: "consul-server.consul.svc", HTTPPort: 8500, TLSDisabled: true,
								NodeName: "node1-virtual", ProxyServiceIDPath: "/consul/connect-inject/proxyid",
								LoginMeta: map[string]string{"pod": "default/web-7d4b", "pod-uid": "0b7e1c7a"},
							}
							if tls {
								want.HTTPPort, want.TLSDisabled = 8501, false
								want.TLSServerName, want.CACerts = "server.dc1.consul", "/consul/connect-inject/consul-ca.pem"
							}
							if acls {
								want.CredentialType, want.LoginAuthMethod = "login", "consul-k8s-auth-method"
								want.LoginBearerTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"
							}
							if !reflect.DeepEqual(*a, want) {
								t.Errorf("agentless config\n got %+v\nwant %+v", *a, want)
							}
							if c.AdminAddr != "127.0.0.1:19000" || c.LogLevel != "info" || c.LogJSON {
								t.Errorf("admin %q log %q json %v", c.AdminAddr, c.LogLevel, c.LogJSON)
							}
							wantDNS := ""
							if dns {
								wantDNS = "127.0.0.1:8600"
							}
							if c.DNSAddr != wantDNS {
								t.Errorf("DNS addr %q, want %q", c.DNSAddr, wantDNS)
							}
							if dp.GracefulPort != 20600 || dp.ShutdownDrainListeners != lifecycle ||
								(lifecycle && dp.ShutdownGracePeriod != 30) || dp.PromScrapePath != "/metrics" {
								t.Errorf("lifecycle/metrics fields: %+v", dp)
							}
							if metrics && (dp.PromMergePort != 20100 || dp.PromServiceMetricsURL != "http://127.0.0.1:9102/metrics") {
								t.Errorf("metrics merging fields: %+v", dp)
							}
							if got := strings.Join(dp.Ignored, " "); got != "-envoy-concurrency=2 -xds-bind-addr=127.0.0.1" {
								t.Errorf("ignored %q", got)
							}
							// ferry's own defaults are untouched.
							if c.MaxConnections != defaultMaxConnections || c.ProxyUID != 5995 || !c.Tunnels {
								t.Errorf("ferry defaults changed: %+v", c)
							}
						})
					}
				}
			}
		}
	}
}

func on(name string, b bool) string {
	if b {
		return name
	}
	return "no-" + name
}

func TestParseDataplaneOther(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	base := []string{"-addresses", "10.0.0.1", "-service-node-name", "n1-virtual", "-proxy-service-id", "p1"}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
		check   func(t *testing.T, c runConfig, dp dataplaneConfig)
	}{
		{name: "env only", env: map[string]string{"DP_CONSUL_ADDRESSES": "exec=echo 10.0.0.1", "DP_SERVICE_NODE_NAME": "n",
			"DP_PROXY_SERVICE_ID": "p", "DP_CREDENTIAL_TYPE": "static", "DP_CREDENTIAL_STATIC_TOKEN": "s3cr3t",
			"DP_TLS_DISABLED": "true", "DP_HTTP_PORT": "18500", "DP_LOG_LEVEL": "DEBUG", "DP_LOG_JSON": "true",
			"DP_CONSUL_DNS_BIND_PORT": "8600"},
			check: func(t *testing.T, c runConfig, dp dataplaneConfig) {
				a := c.Agentless
				if a.Addresses != "exec=echo 10.0.0.1" || a.StaticToken != "s3cr3t" || a.HTTPPort != 18500 ||
					c.LogLevel != "debug" || !c.LogJSON || c.DNSAddr != "127.0.0.1:8600" || c.ProxyID != "p" {
					t.Errorf("%+v %+v", c, *a)
				}
			}},
		{name: "flag beats env", args: append([]string{"-http-port=9999"}, base...), env: map[string]string{"DP_HTTP_PORT": "18500"},
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.Agentless.HTTPPort != 9999 {
					t.Errorf("port %d", c.Agentless.HTTPPort)
				}
			}},
		{name: "ferry flags too", args: append([]string{"-max-connections=7", "-virtual-cidr=10.96.0.0/12", "-tunnels=false"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.MaxConnections != 7 || len(c.VirtualCIDRs) != 1 || c.Tunnels {
					t.Errorf("%+v", c)
				}
			}},
		{name: "envoy args after --", args: append(append([]string{}, base...), "--", "--base-id", "1", "--log-level", "debug"),
			check: func(t *testing.T, _ runConfig, dp dataplaneConfig) {
				if got := strings.Join(dp.Ignored, " "); got != "--base-id 1 --log-level debug" {
					t.Errorf("ignored %q", got)
				}
			}},
		{name: "login meta flag", args: append([]string{"-login-meta", "a=b", "-login-meta", "c=d=e"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if !reflect.DeepEqual(c.Agentless.LoginMeta, map[string]string{"a": "b", "c": "d=e"}) {
					t.Errorf("%v", c.Agentless.LoginMeta)
				}
			}},
		{name: "admin port", args: append([]string{"-envoy-admin-bind-port=19005"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.AdminAddr != "127.0.0.1:19005" {
					t.Errorf("%q", c.AdminAddr)
				}
			}},
		{name: "readiness listener (use-proxy-health-check)", args: append([]string{"-envoy-ready-bind-port=21000"}, base...),
			env: map[string]string{"DP_ENVOY_READY_BIND_ADDRESS": "198.18.0.5"},
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.ReadyAddr != "198.18.0.5:21000" {
					t.Errorf("ready addr %q", c.ReadyAddr)
				}
			}},
		{name: "readiness port without address", args: append([]string{"-envoy-ready-bind-port=21000"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.ReadyAddr != ":21000" {
					t.Errorf("ready addr %q", c.ReadyAddr)
				}
			}},
		{name: "no readiness listener by default", args: base,
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.ReadyAddr != "" {
					t.Errorf("ready addr %q", c.ReadyAddr)
				}
			}},
		{name: "metrics TLS", args: append([]string{"-telemetry-prom-ca-certs-path=/ca", "-telemetry-prom-cert-file=/c", "-telemetry-prom-key-file=/k"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.PromCACertsPath != "/ca" || c.PromCertFile != "/c" || c.PromKeyFile != "/k" {
					t.Errorf("%q %q %q", c.PromCACertsPath, c.PromCertFile, c.PromKeyFile)
				}
			}},
		{name: "metrics TLS as consul-k8s passes it", args: append([]string{"-telemetry-prom-ca-certs-file=/ca.pem", "-telemetry-prom-ca-certs-path=", "-telemetry-prom-cert-file=/c", "-telemetry-prom-key-file=/k"}, base...),
			check: func(t *testing.T, c runConfig, _ dataplaneConfig) {
				if c.PromCACertsPath != "/ca.pem" {
					t.Errorf("CA %q", c.PromCACertsPath)
				}
			}},
		{name: "metrics TLS without a CA", args: append([]string{"-telemetry-prom-cert-file=/c", "-telemetry-prom-key-file=/k"}, base...), wantErr: "needs all of"},
		{name: "metrics TLS without a key", args: append([]string{"-telemetry-prom-ca-certs-path=/ca", "-telemetry-prom-cert-file=/c"}, base...), wantErr: "needs all of"},
		{name: "check-proxy-health alone", args: []string{"-check-proxy-health"},
			check: func(t *testing.T, _ runConfig, dp dataplaneConfig) {
				if !dp.CheckProxyHealth {
					t.Error("not set")
				}
			}},
		{name: "no addresses", args: []string{"-service-node-name", "n", "-proxy-service-id", "p"}, wantErr: "-addresses is required"},
		{name: "no node", args: []string{"-addresses", "x", "-proxy-service-id", "p"}, wantErr: "-service-node-name is required"},
		{name: "no proxy id", args: []string{"-addresses", "x", "-service-node-name", "n"}, wantErr: "-proxy-service-id"},
		{name: "bad credential type", args: append([]string{"-credential-type=jwt"}, base...), wantErr: "static or login"},
		{name: "login without method", args: append([]string{"-credential-type=login", "-login-bearer-token=x"}, base...), wantErr: "-login-auth-method"},
		{name: "static without token", args: append([]string{"-credential-type=static"}, base...), wantErr: "-static-token"},
		{name: "bad env int", args: base, env: map[string]string{"DP_HTTP_PORT": "x"}, wantErr: "DP_HTTP_PORT"},
		{name: "bad meta", args: base, env: map[string]string{"DP_CREDENTIAL_LOGIN_META2": "novalue"}, wantErr: "key=value"},
		{name: "dns-proxy mode", args: append([]string{"-mode=dns-proxy"}, base...), wantErr: "only sidecar"},
		{name: "unknown flag", args: append([]string{"-no-such-flag"}, base...), wantErr: "not defined"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, dp, err := parseDataplane(tc.args, env(tc.env), io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c, dp)
		})
	}
}

func TestIsDataplaneInvocation(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		want bool
	}{
		{[]string{"/usr/local/bin/consul-dataplane"}, true},
		{[]string{"/usr/local/bin/consul-dataplane", "-addresses", "x"}, true},
		{[]string{"/ferry", "-addresses", "x"}, true},
		{[]string{"/ferry", "run", "-proxy-id", "x"}, false},
		{[]string{"/ferry", "-version"}, false},
		{[]string{"/ferry", "-h"}, false},
		{[]string{"/ferry"}, false},
	} {
		if got := isDataplaneInvocation(tc.argv); got != tc.want {
			t.Errorf("%q: %v, want %v", tc.argv, got, tc.want)
		}
	}
}
