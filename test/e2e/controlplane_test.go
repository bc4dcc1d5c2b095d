package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// cpMesh is a control plane run from the trellis binary, with two
// workloads whose sidecars follow it: checkout (web) calls orders
// (shipping).
type cpMesh struct {
	t                   *testing.T
	dir                 string
	listen, adminListen string
	cp                  *proc
	appPort, outPort    int
	ordersAdmin         string
	checkoutAdmin       string
}

func newCPMesh(t *testing.T) *cpMesh {
	t.Helper()
	dir := t.TempDir()
	m := &cpMesh{
		t: t, dir: dir,
		listen:      fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		adminListen: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		appPort:     backend(t),
		outPort:     freePort(t),
	}
	inPort := freePort(t)
	write := func(name, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("control-plane.yaml", fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ControlPlane
listen: %s
adminListen: %s
resources: policies
gracePeriod: 1m
workloads:
  - {namespace: shipping, name: orders-api, serviceAccount: orders-api, labels: {app: orders-api}, ports: [{port: %d, protocol: http}]}
  - {namespace: default, name: checkout, serviceAccount: checkout-service, labels: {app: checkout}}
services:
  - {namespace: shipping, name: orders-api, selector: {app: orders-api}, ports: [{name: http, port: 80, targetPort: %d}]}
`, m.listen, m.adminListen, m.appPort, m.appPort))
	write("policies/README.txt", "policies for the test mesh\n")
	write("orders.yaml", fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: shipping, name: orders-api}
inbound:
  - {listen: "127.0.0.1:%d", appPort: %d, protocol: http}
`, inPort, m.appPort))
	write("checkout.yaml", fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: default, name: checkout}
outbound:
  - {listen: "127.0.0.1:%d", service: orders-api.shipping}
`, m.outPort))
	m.startControlPlane()
	m.ordersAdmin = m.sidecar("orders", "shipping", "orders-api", "orders-1")
	m.checkoutAdmin = m.sidecar("checkout", "default", "checkout-service", "checkout-1")
	return m
}

func (m *cpMesh) startControlPlane() {
	m.t.Helper()
	m.cp = background(m.t, m.dir, "control plane serving", trellisBin, "control-plane", "--config", "control-plane.yaml", "--init")
}

// stopControlPlane stops it as a service manager would, with SIGTERM.
func (m *cpMesh) stopControlPlane() {
	m.t.Helper()
	if err := m.cp.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		m.t.Fatal(err)
	}
	select {
	case <-m.cp.exited:
	case <-time.After(10 * time.Second):
		m.t.Fatal("the control plane did not stop within 10s of SIGTERM")
	}
}

// sidecar starts a proxy that bootstraps with a join token and follows the
// control plane; it returns the admin address once the proxy is ready
// (certificate and first configuration).
func (m *cpMesh) sidecar(name, ns, sa, instance string) string {
	m.t.Helper()
	token := trellis(m.t, m.dir, "token", "create", "-n", ns, "--service-account", sa)
	tokenFile := filepath.Join(m.dir, name+".token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		m.t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(m.t))
	background(m.t, m.dir, "admin endpoints listening", proxyBin,
		"--identity-addr", m.listen, "--ca-bundle", ".trellis/bundle.pem", "--namespace", ns, "--service-account", sa,
		"--join-token-file", tokenFile, "--config", name+".yaml", "--control-plane", "--instance", instance, "--admin-addr", admin)
	waitFor(m.t, 20*time.Second, name+" ready", func() bool { return httpGet(m.t, "http://"+admin+"/ready") == http.StatusOK })
	return admin
}

func (m *cpMesh) writePolicy(name, content string) {
	m.t.Helper()
	// Renamed into place, as editors do, so no half-written file is loaded.
	tmp := filepath.Join(m.dir, name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "policies", name)); err != nil {
		m.t.Fatal(err)
	}
}

// order sends a request through checkout's sidecar and returns the status.
func (m *cpMesh) order(method string) int {
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d/v1/orders", m.outPort), nil)
	if err != nil {
		m.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func configVersion(t *testing.T, admin string) string {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/config")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var c struct {
		ConfigVersion string `json:"configVersion"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&c); err != nil {
		t.Fatal(err)
	}
	return c.ConfigVersion
}

type statusJSON struct {
	Converged bool `json:"converged"`
	Proxies   []struct {
		Instance       string `json:"instance"`
		Connected      bool   `json:"connected"`
		CurrentVersion string `json:"currentVersion"`
		AckedVersion   string `json:"ackedVersion"`
	} `json:"proxies"`
}

func (m *cpMesh) status() statusJSON {
	m.t.Helper()
	var st statusJSON
	if err := json.Unmarshal([]byte(trellis(m.t, m.dir, "status", "-o", "json")), &st); err != nil {
		m.t.Fatal(err)
	}
	return st
}

// TestControlPlanePushesPoliciesAndWaitsForProxies: sidecars registered
// with the control plane get the orders endpoint from it, and `trellis
// status --wait` returns only once both proxies run the current
// configuration, so a policy change can be scripted safely.
func TestControlPlanePushesPoliciesAndWaitsForProxies(t *testing.T) {
	m := newCPMesh(t)
	waitFor(t, 10*time.Second, "an order through the mesh", func() bool { return m.order("POST") == http.StatusOK })
	out := trellis(t, m.dir, "status", "--wait", "--timeout", "20s")
	for _, want := range []string{"shipping/orders-api/orders-1", "default/checkout/checkout-1", "spiffe://cluster.local/ns/shipping/sa/orders-api", "Every connected proxy runs its current configuration"} {
		if !strings.Contains(out, want) {
			t.Errorf("status does not show %q:\n%s", want, out)
		}
	}

	// The seed policies: only POST /v1/orders from checkout-service.
	for name, content := range seedPolicies {
		m.writePolicy(name, content)
	}
	trellis(t, m.dir, "status", "--wait", "--timeout", "20s")
	// --wait returned: every proxy must already run the current version,
	// and the policy must be in force without waiting any longer.
	st := m.status()
	current := map[string]string{}
	for _, p := range st.Proxies {
		if !p.Connected || p.AckedVersion != p.CurrentVersion {
			t.Fatalf("status --wait returned with %+v not in sync", p)
		}
		current[p.Instance] = p.CurrentVersion
	}
	for instance, admin := range map[string]string{"shipping/orders-api/orders-1": m.ordersAdmin, "default/checkout/checkout-1": m.checkoutAdmin} {
		if got := configVersion(t, admin); got != current[instance] {
			t.Fatalf("%s runs configuration %q, the control plane's current one is %q", instance, got, current[instance])
		}
	}
	if code := m.order("GET"); code != http.StatusForbidden {
		t.Fatalf("GET /v1/orders right after status --wait = %d, want 403", code)
	}
	if code := m.order("POST"); code != http.StatusOK {
		t.Fatalf("POST /v1/orders = %d, want 200", code)
	}

	// An invalid edit is rejected whole and reported; the policy stays.
	m.writePolicy("allow.yaml", strings.Replace(seedPolicies["allow.yaml"], "methods:", "method:", 1))
	waitFor(t, 10*time.Second, "the rejection in status", func() bool {
		return strings.Contains(trellis(t, m.dir, "status"), "REJECTED")
	})
	out = trellis(t, m.dir, "status")
	if !strings.Contains(out, "allow.yaml") || !strings.Contains(out, "method") {
		t.Fatalf("status does not name the file and field:\n%s", out)
	}
	if r := run(t, m.dir, "", trellisBin, "status", "--wait", "--timeout", "5s"); r.err == nil {
		t.Fatalf("status --wait succeeded with a rejected change:\n%s", r.stdout)
	}
	if code := m.order("GET"); code != http.StatusForbidden {
		t.Fatalf("GET after a rejected edit = %d, want 403 (last good policy)", code)
	}
}

// TestControlPlaneRestartUnderTraffic: while requests flow between two
// proxies, the control plane is stopped and started again. No request
// fails; afterwards the proxies are registered and in sync again, and the
// CA is the same.
func TestControlPlaneRestartUnderTraffic(t *testing.T) {
	m := newCPMesh(t)
	waitFor(t, 10*time.Second, "an order through the mesh", func() bool { return m.order("POST") == http.StatusOK })
	trellis(t, m.dir, "status", "--wait", "--timeout", "20s")
	bundle, err := os.ReadFile(filepath.Join(m.dir, ".trellis", "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}

	var (
		sent, failed atomic.Int64
		stop         = make(chan struct{})
		wg           sync.WaitGroup
		firstErr     sync.Once
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			sent.Add(1)
			if code := m.order("POST"); code != http.StatusOK {
				failed.Add(1)
				firstErr.Do(func() { t.Errorf("request failed during the restart: status %d", code) })
			}
		}
	}()
	before := sent.Load()
	waitFor(t, 10*time.Second, "traffic", func() bool { return sent.Load() > before+50 })
	m.stopControlPlane()
	mid := sent.Load()
	waitFor(t, 10*time.Second, "traffic while the control plane is down", func() bool { return sent.Load() > mid+50 })
	m.startControlPlane()
	waitFor(t, 30*time.Second, "both proxies back and in sync", func() bool {
		st := m.status()
		connected := 0
		for _, p := range st.Proxies {
			if p.Connected {
				connected++
			}
		}
		return connected == 2 && st.Converged
	})
	after := sent.Load()
	waitFor(t, 10*time.Second, "traffic after the restart", func() bool { return sent.Load() > after+50 })
	close(stop)
	wg.Wait()
	t.Logf("%d requests, %d failed", sent.Load(), failed.Load())

	bundle2, err := os.ReadFile(filepath.Join(m.dir, ".trellis", "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bundle, bundle2) {
		t.Fatal("the trust bundle changed across the restart")
	}
	// The registrations survived: both instances are known, none was
	// dropped and re-added (which would have changed the orders endpoint).
	out := trellis(t, m.dir, "status")
	for _, want := range []string{"shipping/orders-api/orders-1", "default/checkout/checkout-1"} {
		if !strings.Contains(out, want) {
			t.Errorf("status after the restart does not show %q:\n%s", want, out)
		}
	}
}
