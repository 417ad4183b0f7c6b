package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/consulguard"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// decideKTLS runs the start-up kernel TLS check for -ktls and says once
// what it found. -ktls=required fails here when the kernel cannot.
func decideKTLS(ctx context.Context, cfg runConfig, log hclog.Logger) (proxy.KTLS, error) {
	use, reason, err := ktls.Decide(ctx, cfg.KTLS)
	if err != nil {
		return proxy.KTLS{}, err
	}
	switch {
	case !use:
		log.Info("kernel TLS not used: mTLS sessions stay in user space", "ktls", cfg.KTLS, "reason", reason)
	case cfg.Tunnels:
		log.Info("kernel TLS available: tunnel sessions offered to and accepted from ferry peers", "ktls", cfg.KTLS)
	default:
		log.Info("kernel TLS available: offered to and accepted from ferry peers", "ktls", cfg.KTLS)
	}
	return proxy.KTLS{Use: use, Required: cfg.KTLS == ktls.Required}, nil
}

func runRun(args []string, stdout, stderr io.Writer) error {
	if dataplaneArgs(args) {
		// The injector runs `/ferry run` with consul-dataplane's arguments.
		return runDataplane(args, stdout, stderr)
	}
	cfg, err := parseRunFlags(args, stderr)
	if err != nil {
		return err
	}
	if cfg.CheckProxyHealth {
		return checkProxyHealth(cfg.AdminAddr)
	}
	return startRun(cfg, stderr)
}

// startRun runs the sidecar configured by either command line until a
// signal.
func startRun(cfg runConfig, stderr io.Writer) error {
	log := hclog.New(&hclog.LoggerOptions{Name: "ferry", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr,
		JSONFormat: cfg.LogJSON})
	if uid := os.Getuid(); uid != cfg.ProxyUID {
		log.Warn("ferry runs as a UID other than -proxy-uid: unless the redirect rules exempt this UID, its own connections loop back to it (they are reset as outcome loop)",
			"uid", uid, "proxy_uid", cfg.ProxyUID)
	}

	kt, err := decideKTLS(context.Background(), cfg, log)
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	cfg.kernelTLS = kt

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	return runProxy(cfg, log, sigs)
}

// runProxy runs the sidecar until the first signal, then drains until the
// drain timeout or a second signal.
func runProxy(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal) error {
	var (
		client *api.Client
		reg    proxy.Registration
		id     string
		late   *lateAdmin
		lc     = newLifecycle()
	)
	if cfg.Agentless != nil {
		// Agentless: the admin listener comes first, so that /ready says
		// why ferry cannot log in or reach a server while it retries.
		srv, err := newServerConn(cfg.Agentless, log)
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		late = &lateAdmin{pre: srv.readyErr, extra: srv}
		closeAdmin, err := startAdmin(cfg, lc, late.Ready, late, log)
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		defer closeAdmin()
		// The lifecycle listener too: a native sidecar's startup hook
		// sees "not ready" rather than a refused connection, and
		// /graceful_shutdown ends a login that does not succeed.
		lca, err := lc.start(cfg, late.Ready, log.Named("lifecycle"))
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		if lca != nil {
			defer lca.Close()
		}
		defer srv.close(log)
		if !srv.start(sigs, lc, log) {
			return nil
		}
		client = srv.client
		reg = srv.registration()
		if cfg.ConsulDNSAddr == "" {
			cfg.ConsulDNSMore = srv.dnsAddrs()
		}
		id = srv.proxyID
	} else {
		var err error
		client, id, err = agentClient(cfg, log, sigs)
		if err != nil || client == nil {
			return err
		}
		reg = proxy.AgentRegistration{Agent: client.Agent(), ID: id}
	}
	return serve(cfg, log, sigs, client, reg, id, late, lc)
}

// agentClient is the local agent's client and the proxy's ID (nil client:
// a signal came first).
func agentClient(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal) (*api.Client, string, error) {
	acfg := api.DefaultConfig() // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
	if cfg.HTTPAddr != "" {
		acfg.Address = cfg.HTTPAddr
	}
	if cfg.Token != "" {
		acfg.Token = cfg.Token
	}
	// Bounded answers (proxy/consulguard): a broken agent's huge, endless
	// or never-sent answer must not grow ferry's memory or freeze a watch.
	// (A unix:// address gets consul/api's own client, unguarded.)
	hc, err := api.NewHttpClient(acfg.Transport, acfg.TLSConfig)
	if err != nil {
		return nil, "", fmt.Errorf("run: consul client: %w", err)
	}
	hc.Transport = consulguard.New(hc.Transport, consulguard.Config{})
	acfg.HttpClient = hc
	client, err := api.NewClient(acfg)
	if err != nil {
		return nil, "", fmt.Errorf("run: consul client: %w", err)
	}
	id := cfg.ProxyID
	if id == "" {
		// The sidecar may be registered after the proxy starts (k8s
		// ordering), so keep looking until a signal.
		for {
			id, err = proxy.FindSidecar(client.Agent(), cfg.SidecarFor)
			if err == nil {
				break
			}
			log.Warn("looking for the sidecar registration", "error", err)
			select {
			case <-sigs:
				return nil, "", nil
			case <-time.After(2 * time.Second):
			}
		}
	}
	return client, id, nil
}

// serve runs the sidecar for reg until a signal, then drains. late, when
// set, is the admin listener already up (agentless); otherwise serve
// starts it.
func serve(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal, client *api.Client, reg proxy.Registration, id string, late *lateAdmin, lc *lifecycle) error {
	log = log.With("proxy_id", id)

	promTLS, err := promTLSConfig(cfg, log.Named("metrics"))
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	sc, err := proxy.StartSidecar(proxy.SidecarConfig{
		Client:       client,
		ProxyID:      id,
		Registration: reg,
		Overrides:    proxy.Endpoints{Inbound: cfg.Inbound, Outbound: cfg.Outbound, LocalApp: cfg.LocalApp},
		Proxy: proxy.Config{
			Logger:         log.Named("proxy"),
			ConnectTimeout: cfg.ConnectTimeout,
			IdleTimeout:    idleOrDisabled(cfg.IdleTimeout),
			MaxConnections: cfg.MaxConnections,
		},
		Permissive:        cfg.Permissive,
		HandshakeTimeout:  cfg.HandshakeTimeout,
		DisableRevocation: !cfg.LiveRevocation,
		DisableTunnels:    !cfg.Tunnels,
		KTLS:              cfg.kernelTLS,
		VirtualCIDRs:      cfg.VirtualCIDRs,
		// Checked in parseRunFlags.
		DefaultIntentionPolicy: intentions.Policy(cfg.DefaultPolicy),
		PromScrapePath:         cfg.PromScrapePath,
		PromServiceMetricsURL:  cfg.PromServiceMetricsURL,
		PromTLS:                promTLS,
	})
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	p := sc.Proxy()
	// DNS before admin: once /ready answers 200, names resolve.
	dnsSrv, err := startDNS(cfg, sc.View(), p.Metrics().Set, log)
	if err != nil {
		sc.Shutdown(canceledContext())
		return fmt.Errorf("run: %w", err)
	}
	if dnsSrv != nil {
		defer dnsSrv.Close()
	}
	if late != nil {
		late.set(p)
	} else {
		closeAdmin, err := startAdmin(cfg, lc, p.Ready, p.Metrics().Set, log)
		if err != nil {
			sc.Shutdown(canceledContext())
			return fmt.Errorf("run: %w", err)
		}
		defer closeAdmin()
	}

	lca, err := lc.start(cfg, p.Ready, log.Named("lifecycle"))
	if err != nil {
		sc.Shutdown(canceledContext())
		return fmt.Errorf("run: %w", err)
	}
	if lca != nil {
		defer lca.Close()
	}

	var runErr error
	graceful := false
	select {
	case sig := <-sigs:
		log.Info("signal received, shutting down", "signal", sig, "grace_period", cfg.ShutdownGracePeriod, "drain_timeout", cfg.DrainTimeout)
		graceful = true
	case <-lc.shutdown:
		log.Info("graceful shutdown requested", "grace_period", cfg.ShutdownGracePeriod, "drain_timeout", cfg.DrainTimeout)
		graceful = true
	case <-lc.quit:
		log.Info("quitquitquit: exiting now")
		sc.Shutdown(canceledContext())
		return nil
	case runErr = <-sc.Fatal():
		log.Error("cannot serve the proxy registration", "error", runErr)
	}
	if graceful && cfg.ShutdownGracePeriod > 0 {
		// Inbound stops taking connections; outbound keeps serving so
		// that the app can finish its work through the mesh.
		p.DrainInbound()
		select {
		case <-time.After(cfg.ShutdownGracePeriod):
		case sig := <-sigs:
			log.Warn("second signal, ending the grace period", "signal", sig)
		case <-lc.quit:
			log.Info("quitquitquit: exiting now")
			sc.Shutdown(canceledContext())
			return nil
		}
	}

	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	go func() {
		select {
		case sig := <-sigs:
			log.Warn("second signal, closing now", "signal", sig)
			cancel()
		case <-dctx.Done():
		}
	}()
	if err := sc.Shutdown(dctx); err != nil {
		log.Warn("shutdown", "error", err)
	}
	log.Info("stopped")
	if runErr != nil {
		return fmt.Errorf("run: %w", runErr)
	}
	return nil
}

func canceledContext() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// idleOrDisabled maps the flag's "0 = never" to proxy.Config's "< 0 = never".
func idleOrDisabled(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// dataplaneArgs reports whether args are consul-dataplane's command line
// (-addresses, which ferry run's own flags do not have).
func dataplaneArgs(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		name := strings.TrimLeft(a, "-")
		if i := strings.IndexByte(name, '='); i >= 0 {
			name = name[:i]
		}
		if strings.HasPrefix(a, "-") && name == "addresses" {
			return true
		}
	}
	return false
}
