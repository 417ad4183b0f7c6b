package servers

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// Login is an ACL auth-method login (consul-dataplane -credential-type
// login).
type Login struct {
	// AuthMethod is the auth method's name (-login-auth-method).
	AuthMethod string
	// BearerTokenPath is read at every login (the kubelet rotates
	// projected tokens); BearerToken is used when the path is empty.
	BearerTokenPath string
	BearerToken     string
	// Meta is sent with the login and ends up in the token's description;
	// consul-k8s finds a pod's tokens by its keys pod and pod-uid.
	Meta map[string]string
	// Namespace and Partition (Enterprise) are sent as ?ns= / ?partition=.
	Namespace, Partition string
}

// Credentials keeps the pool's ACL token: a static one, or one from a
// login that is repeated when the servers reject the token (deleted,
// expired) and logged out at Close.
type Credentials struct {
	pool   *Pool
	client *api.Client
	login  *Login
	log    hclog.Logger

	mu       sync.Mutex
	secret   string
	accessor string
	loggedIn time.Time
	err      error
	logins   int
}

// replicationWait bounds how long a new login token may be unknown to the
// server in use: the leader creates it and followers learn it moments
// later, answering "ACL not found" until then.
const replicationWait = 5 * time.Second

// NewCredentials sets up the pool's token: static (login nil) or by login
// (the first login happens in Start).
func NewCredentials(pool *Pool, client *api.Client, static string, login *Login, log hclog.Logger) *Credentials {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	c := &Credentials{pool: pool, client: client, login: login, log: log}
	if login == nil {
		pool.SetToken(static)
		c.secret = static
		return c
	}
	pool.OnTokenRejected(c.relogin)
	return c
}

// Start logs in, retrying with backoff (1 s doubling to 30 s) until it
// succeeds or ctx is done; Err says why meanwhile. With a static token it
// returns at once.
func (c *Credentials) Start(ctx context.Context) error {
	if c.login == nil {
		return nil
	}
	backoff := time.Second
	for {
		_, err := c.relogin(ctx, "")
		if err == nil {
			return nil
		}
		c.log.Error("ACL login failed; retrying", "error", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// CheckInterval is how often Watch asks whether the login token still
// exists. Blocking queries with a deleted token only fail when they wake,
// which can take minutes; this bounds how long ferry goes without noticing.
const CheckInterval = 30 * time.Second

// Watch checks the login token every interval until ctx is done and logs
// in again when the servers no longer know it (deleted, expired). It does
// nothing with a static token.
func (c *Credentials) Watch(ctx context.Context, interval time.Duration) {
	if c.login == nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
		c.mu.Lock()
		secret := c.secret
		c.mu.Unlock()
		if secret == "" {
			if _, err := c.relogin(ctx, ""); err != nil && ctx.Err() == nil {
				c.log.Error("ACL login failed", "error", err)
			}
			continue
		}
		// Through the pool: a 403 "ACL not found" there logs in again.
		_, _, err := c.client.ACL().TokenReadSelf((&api.QueryOptions{AllowStale: true}).WithContext(ctx))
		if err != nil && ctx.Err() == nil {
			c.log.Debug("token check failed", "error", err)
		}
	}
}

// Err is why there is no usable token (the last login's error), or nil.
func (c *Credentials) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Logins counts successful logins.
func (c *Credentials) Logins() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logins
}

// Accessor is the current login token's AccessorID ("" with a static one).
func (c *Credentials) Accessor() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.accessor
}

// relogin logs in unless the token in force is no longer rejected (another
// request has already logged in again) and returns the token.
func (c *Credentials) relogin(ctx context.Context, rejected string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if rejected != "" && c.secret != rejected && c.secret != "" {
		return c.secret, nil
	}
	if rejected != "" && rejected == c.secret && time.Since(c.loggedIn) < replicationWait {
		// Too new to be deleted: the server has not caught up yet.
		c.waitReplicated(ctx, c.secret)
		return c.secret, nil
	}
	if rejected != "" {
		c.log.Warn("the servers rejected the ACL token (deleted or expired); logging in again", "accessor", c.accessor)
	}
	tok, err := c.doLogin(ctx)
	if err != nil {
		c.err = err
		return "", err
	}
	c.secret, c.accessor, c.err = tok.SecretID, tok.AccessorID, nil
	c.loggedIn = time.Now()
	c.logins++
	c.pool.SetToken(tok.SecretID)
	c.waitReplicated(ctx, tok.SecretID)
	c.log.Info("logged in", "auth_method", c.login.AuthMethod, "accessor", tok.AccessorID)
	return tok.SecretID, nil
}

// waitReplicated waits (up to replicationWait from the login) until the
// server in use knows the token, as consul-dataplane does after a login.
func (c *Credentials) waitReplicated(ctx context.Context, secret string) {
	ctx, cancel := context.WithDeadline(ctx, c.loggedIn.Add(replicationWait))
	defer cancel()
	for {
		_, _, err := c.client.ACL().TokenReadSelf((&api.QueryOptions{Token: secret, AllowStale: true}).WithContext(ctx))
		if err == nil || !strings.Contains(err.Error(), "ACL not found") {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (c *Credentials) doLogin(ctx context.Context) (*api.ACLToken, error) {
	l := c.login
	bearer := l.BearerToken
	if l.BearerTokenPath != "" {
		b, err := os.ReadFile(l.BearerTokenPath)
		if err != nil {
			return nil, fmt.Errorf("login: read bearer token: %w", err)
		}
		bearer = strings.TrimSpace(string(b))
	}
	if bearer == "" {
		return nil, errors.New("login: empty bearer token")
	}
	q := (&api.WriteOptions{Namespace: l.Namespace, Partition: l.Partition}).WithContext(ctx)
	tok, _, err := c.client.ACL().Login(&api.ACLLoginParams{AuthMethod: l.AuthMethod, BearerToken: bearer, Meta: l.Meta}, q)
	if err != nil {
		return nil, fmt.Errorf("login with auth method %q: %w", l.AuthMethod, err)
	}
	return tok, nil
}

// Close logs the login token out (deleting it), with ctx's deadline. A
// static token is left alone.
func (c *Credentials) Close(ctx context.Context) error {
	if c.login == nil {
		return nil
	}
	c.mu.Lock()
	secret, accessor := c.secret, c.accessor
	c.secret, c.accessor = "", ""
	c.mu.Unlock()
	if secret == "" {
		return nil
	}
	if _, err := c.client.ACL().Logout((&api.WriteOptions{Token: secret}).WithContext(ctx)); err != nil {
		return fmt.Errorf("logout (token %s): %w", accessor, err)
	}
	c.log.Info("logged out", "accessor", accessor)
	return nil
}
