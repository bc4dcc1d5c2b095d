package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestProxyObtainsIdentity starts the identity service and a trellis-proxy
// with a join token: the proxy becomes ready only once it holds a
// certificate, and reports its identity on the admin port.
func TestProxyObtainsIdentity(t *testing.T) {
	dir := newMeshDir(t)
	identityAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	adminAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	token := trellis(t, dir, "token", "create", "-n", "shipping", "--service-account", "orders-api")
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	// The proxy starts first: it must wait for the control plane, not fail.
	background(t, dir, "admin endpoints listening", proxyBin,
		"--identity-addr", identityAddr, "--admin-addr", adminAddr, "--ca-bundle", ".trellis/bundle.pem",
		"--namespace", "shipping", "--service-account", "orders-api", "--join-token-file", "token")
	if code := httpGet(t, "http://"+adminAddr+"/ready"); code != http.StatusServiceUnavailable {
		t.Fatalf("/ready before the control plane is up = %d, want 503", code)
	}
	background(t, dir, "listening on", trellisBin, "identity", "serve", "--listen", identityAddr)

	waitFor(t, 30*time.Second, "proxy ready", func() bool { return httpGet(t, "http://"+adminAddr+"/ready") == http.StatusOK })
	resp, err := http.Get("http://" + adminAddr + "/config")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cfg struct {
		Identity struct {
			SPIFFEID        string  `json:"spiffeId"`
			SecondsToExpiry float64 `json:"secondsToExpiry"`
		} `json:"identity"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Identity.SPIFFEID != "spiffe://cluster.local/ns/shipping/sa/orders-api" || cfg.Identity.SecondsToExpiry < 3600 {
		t.Fatalf("/config identity = %+v", cfg.Identity)
	}
}

func TestProxyRejectsIncompleteFlags(t *testing.T) {
	r := run(t, t.TempDir(), "", proxyBin, "--namespace", "shipping")
	if r.err == nil || !strings.Contains(r.stderr, "--ca-bundle") || !strings.Contains(r.stderr, "--static") {
		t.Fatalf("incomplete flags: %v\n%s", r.err, r.stderr)
	}
}

func httpGet(t *testing.T, url string) int {
	t.Helper()
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond) // polling interval, not a wait for an outcome
	}
}

// TestSidecarsBootstrappedFromTheIdentityService is the flow a user runs:
// the identity service up, a join token per workload, two sidecars that
// obtain their certificates with them and carry a request as mutual TLS.
func TestSidecarsBootstrappedFromTheIdentityService(t *testing.T) {
	m := newMesh(t)
	identityAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	background(t, m.dir, "listening on", trellisBin, "identity", "serve", "--listen", identityAddr)
	app := backend(t)
	inPort, outPort := freePort(t), freePort(t)
	sidecar := func(ns, sa, config string) string {
		t.Helper()
		token := trellis(t, m.dir, "token", "create", "-n", ns, "--service-account", sa)
		tokenFile := filepath.Join(m.dir, sa+".token")
		cfgFile := filepath.Join(m.dir, sa+".yaml")
		if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
		admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		background(t, m.dir, "admin endpoints listening", proxyBin, "--identity-addr", identityAddr, "--admin-addr", admin,
			"--ca-bundle", ".trellis/bundle.pem", "--namespace", ns, "--service-account", sa, "--join-token-file", tokenFile, "--config", cfgFile)
		waitFor(t, 15*time.Second, sa+" ready", func() bool { return httpGet(t, "http://"+admin+"/ready") == http.StatusOK })
		return admin
	}
	serverAdmin := sidecar("shipping", "orders-api", serverConfig(inPort, app, "http", m.policies(seedPolicies)))
	sidecar("default", "checkout-service", clientConfig(outPort, inPort, "http", ordersID))

	r := curl(t, "-X", "POST", fmt.Sprintf("http://127.0.0.1:%d/v1/orders", outPort))
	if r.code != "200" || !strings.Contains(r.body, "orders-api saw POST /v1/orders") {
		t.Fatalf("POST through sidecars with service-issued identities: %+v", r)
	}
	if !strings.Contains(httpBody(t, "http://"+serverAdmin+"/config"), `"source": "identity-service `+identityAddr+`"`) {
		t.Fatal("the server sidecar's identity did not come from the identity service")
	}
}
