package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/proxy"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// runConfig is everything `ferry run` needs, from flags and environment.
type runConfig struct {
	ProxyID, SidecarFor string
	HTTPAddr, Token     string
	Inbound, Outbound   string // listener overrides ("" = from the registration)
	LocalApp            string
	AdminAddr           string
	MaxConnections      int
	ConnectTimeout      time.Duration
	IdleTimeout         time.Duration
	DrainTimeout        time.Duration
	LogLevel            string
}

func parseRunFlags(args []string, stderr io.Writer) (runConfig, error) {
	var c runConfig
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.ProxyID, "proxy-id", os.Getenv("CONNECT_PROXY_ID"), "ID of the proxy's registration with the local agent (env CONNECT_PROXY_ID)")
	fs.StringVar(&c.SidecarFor, "sidecar-for", os.Getenv("CONNECT_SIDECAR_FOR"), "ID of the service whose sidecar this is; finds the one connect-proxy for it (env CONNECT_SIDECAR_FOR)")
	fs.StringVar(&c.HTTPAddr, "http-addr", "", "Consul agent HTTP address (default: env CONSUL_HTTP_ADDR, else 127.0.0.1:8500)")
	fs.StringVar(&c.Token, "token", "", "Consul ACL token (default: env CONSUL_HTTP_TOKEN)")
	fs.StringVar(&c.Inbound, "inbound-addr", "", "inbound listen address (default: 0.0.0.0:<bind_port or proxy port>)")
	fs.StringVar(&c.Outbound, "outbound-addr", "", "outbound listen address (default: 127.0.0.1:<OutboundListenerPort or 15001>)")
	fs.StringVar(&c.LocalApp, "local-app", "", "local application address (default: <LocalServiceAddress or 127.0.0.1>:<LocalServicePort>)")
	fs.StringVar(&c.AdminAddr, "admin-addr", "127.0.0.1:19000", "admin HTTP address (/ready, /metrics)")
	fs.IntVar(&c.MaxConnections, "max-connections", 0, "per-listener cap on concurrent connections; new ones past it are reset (0 = no cap)")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", proxy.DefaultConnectTimeout, "upstream and local-app connect timeout")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", proxy.DefaultIdleTimeout, "close a connection after this long without traffic in either direction (0 = never)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 15*time.Second, "on SIGTERM/SIGINT, how long established connections may finish")
	fs.StringVar(&c.LogLevel, "log-level", "info", "trace, debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, &exitError{code: 0, err: errHelp}
		}
		return c, &exitError{code: 2, err: err}
	}
	switch {
	case fs.NArg() > 0:
		return c, usageError("run: unexpected arguments %q", fs.Args())
	case c.ProxyID == "" && c.SidecarFor == "":
		return c, usageError("run: one of -proxy-id or -sidecar-for is required")
	case c.ProxyID != "" && c.SidecarFor != "":
		return c, usageError("run: -proxy-id and -sidecar-for are mutually exclusive")
	case c.MaxConnections < 0:
		return c, usageError("run: -max-connections must be >= 0")
	case c.ConnectTimeout <= 0:
		return c, usageError("run: -connect-timeout must be > 0")
	case c.IdleTimeout < 0 || c.DrainTimeout < 0:
		return c, usageError("run: timeouts must be >= 0")
	case hclog.LevelFromString(c.LogLevel) == hclog.NoLevel:
		return c, usageError("run: unknown -log-level %q", c.LogLevel)
	}
	return c, nil
}

// applyOverrides replaces derived endpoints with the flags that were set.
func (c runConfig) applyOverrides(e proxy.Endpoints) proxy.Endpoints {
	if c.Inbound != "" {
		e.Inbound = c.Inbound
	}
	if c.Outbound != "" {
		e.Outbound = c.Outbound
	}
	if c.LocalApp != "" {
		e.LocalApp = c.LocalApp
	}
	return e
}

func runRun(args []string, stdout, stderr io.Writer) error {
	cfg, err := parseRunFlags(args, stderr)
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "ferry", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr})

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	return runProxy(cfg, log, sigs)
}

// runProxy runs the sidecar until the first signal, then drains until the
// drain timeout or a second signal.
func runProxy(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal) error {
	acfg := api.DefaultConfig() // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
	if cfg.HTTPAddr != "" {
		acfg.Address = cfg.HTTPAddr
	}
	if cfg.Token != "" {
		acfg.Token = cfg.Token
	}
	client, err := api.NewClient(acfg)
	if err != nil {
		return fmt.Errorf("run: consul client: %w", err)
	}
	if acfg.Transport != nil {
		defer acfg.Transport.CloseIdleConnections()
	}

	// The mesh features plug in around here (see proxy/doc.go): hooks known
	// up front go into Config (Router, Acceptor, Registry) together with
	// p.AddReadyCheck and p.Metrics().Set.Register; hooks that need the
	// registration (the destination service name for the leaf, the
	// upstreams) are installed in the WatchService callback below with
	// p.SetRouter / p.SetAcceptor before p.Apply.
	p := proxy.New(proxy.Config{
		Logger:         log.Named("proxy"),
		ConnectTimeout: cfg.ConnectTimeout,
		IdleTimeout:    idleOrDisabled(cfg.IdleTimeout),
		MaxConnections: cfg.MaxConnections,
	})
	admin, err := proxy.StartAdmin(cfg.AdminAddr, proxy.AdminHandler(p.Ready, p.Metrics().Set), log.Named("admin"))
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	defer admin.Close()
	log.Info("admin listening", "addr", admin.Addr())

	ctx, stop := context.WithCancel(context.Background())
	defer stop()

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
				return nil
			case <-time.After(2 * time.Second):
			}
		}
	}
	log = log.With("proxy_id", id)

	// fatal carries a configuration the proxy cannot serve before the
	// first successful Apply; afterwards a bad update is logged and the
	// running configuration stays.
	fatal := make(chan error, 1)
	var watchWG sync.WaitGroup
	watchWG.Add(1)
	go func() {
		defer watchWG.Done()
		applied := false
		proxy.WatchService(ctx, client.Agent(), id, log, func(svc *api.AgentService) {
			eps, err := proxy.EndpointsFromService(svc)
			if err == nil {
				eps = cfg.applyOverrides(eps)
				err = p.Apply(eps)
			}
			switch {
			case err == nil:
				applied = true
			case !applied:
				select {
				case fatal <- err:
				default:
				}
			default:
				log.Error("ignoring proxy registration update", "error", err)
			}
		})
	}()

	var runErr error
	select {
	case sig := <-sigs:
		log.Info("signal received, draining", "signal", sig, "drain_timeout", cfg.DrainTimeout)
	case runErr = <-fatal:
		log.Error("cannot serve the proxy registration", "error", runErr)
	}
	stop()
	watchWG.Wait()

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
	if err := p.Shutdown(dctx); err != nil {
		log.Warn("shutdown", "error", err)
	}
	log.Info("stopped")
	if runErr != nil {
		return fmt.Errorf("run: %w", runErr)
	}
	return nil
}

// idleOrDisabled maps the flag's "0 = never" to proxy.Config's "< 0 = never".
func idleOrDisabled(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
