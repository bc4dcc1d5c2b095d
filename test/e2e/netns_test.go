package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// requireRoot skips a test that needs network namespaces and iptables on a
// developer machine without root, and fails it in CI, which runs as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test needs root (network namespaces, iptables); CI runs as root")
	}
	t.Skip("needs root: network namespaces and iptables")
}

// netHost is a test host: a network namespace with an IPv4 and an IPv6
// address on a veth pair to its peer host. Addresses come from the
// benchmarking ranges, 198.18.0.0/15 and 2001:2::/48; nothing routes off
// the machine and there is no NAT.
type netHost struct {
	name  string
	addr  string
	addr6 string
}

// exec runs a command inside the host's namespace to completion.
func (h netHost) exec(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return run(t, "", stdin, "ip", append([]string{"netns", "exec", h.name}, args...)...)
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// newHostPair creates two namespaces joined by a veth pair and deletes
// them (with their interfaces and iptables rules) when the test ends.
func newHostPair(t *testing.T) (a, b netHost) {
	t.Helper()
	requireRoot(t)
	requireTool(t, "ip")
	requireTool(t, "iptables")
	id := fmt.Sprintf("%d%d", os.Getpid()%10000, time.Now().UnixNano()%1000)
	a = netHost{name: "trl-" + id + "-a", addr: "198.18.0.1", addr6: "2001:2::1"}
	b = netHost{name: "trl-" + id + "-b", addr: "198.18.0.2", addr6: "2001:2::2"}
	vethA, vethB := "trla"+id, "trlb"+id
	for _, h := range []netHost{a, b} {
		mustRun(t, "ip", "netns", "add", h.name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", h.name).Run() })
	}
	mustRun(t, "ip", "link", "add", vethA, "netns", a.name, "type", "veth", "peer", "name", vethB, "netns", b.name)
	for _, x := range []struct {
		h    netHost
		veth string
	}{{a, vethA}, {b, vethB}} {
		mustRun(t, "ip", "-n", x.h.name, "addr", "add", x.h.addr+"/24", "dev", x.veth)
		// nodad: usable at once, without duplicate address detection.
		mustRun(t, "ip", "-n", x.h.name, "addr", "add", x.h.addr6+"/64", "dev", x.veth, "nodad")
		mustRun(t, "ip", "-n", x.h.name, "link", "set", x.veth, "up")
		mustRun(t, "ip", "-n", x.h.name, "link", "set", "lo", "up")
		// Service virtual IPs (198.19.0.0/16) must be routable for the
		// application's connect() to reach the interception rule; the
		// route leads only to the peer namespace.
		mustRun(t, "ip", "-n", x.h.name, "route", "add", "198.19.0.0/16", "dev", x.veth)
		mustRun(t, "ip", "-n", x.h.name, "-6", "route", "add", "2001:2:0:1::/64", "dev", x.veth)
	}
	return a, b
}

// intercept installs the sidecar's rules in h, for IPv4 and IPv6.
func (h netHost) intercept(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"iptables", "ip6tables"} {
		for _, rule := range intercept.Rules(intercept.RuleConfig{InboundPort: 15006, OutboundPort: 15001, ExcludeInboundPorts: []int{15000}}) {
			if r := h.exec(t, "", append([]string{tool}, rule...)...); r.err != nil {
				t.Fatalf("%s %s in %s: %v\n%s", tool, strings.Join(rule, " "), h.name, r.err, r.stderr)
			}
		}
	}
}

// TestTransparentInterception runs two workloads in their own network
// namespaces with the iptables rules of an init container. The caller's
// application dials the service's virtual IP in plain HTTP, unchanged; its
// sidecar intercepts it, resolves the service and originates mTLS to the
// server's sidecar, which intercepts the inbound connection and authorizes
// it by identity. Traffic to an address outside the mesh passes through.
func TestTransparentInterception(t *testing.T) {
	curlBin := requireTool(t, "curl")
	python := requireTool(t, "python3")
	client, server := newHostPair(t)
	client.intercept(t)
	server.intercept(t)
	m := newMesh(t)

	// The application: a real HTTP server on its port, knowing nothing of
	// the mesh; and a second one on a port no policy mentions.
	wwwDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(wwwDir, "v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(wwwDir, "v1", "orders"), []byte("orders list\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, port := range []string{"8080", "9090"} {
		background(t, wwwDir, "Serving HTTP", "ip", "netns", "exec", server.name, python, "-u", "-m", "http.server", port, "--bind", "::")
	}
	// A server the workload keeps to itself, on loopback only.
	background(t, wwwDir, "Serving HTTP", "ip", "netns", "exec", server.name, python, "-u", "-m", "http.server", "7070", "--bind", "127.0.0.1")
	pol := m.policies(map[string]string{"allow.yaml": `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: checkout-reads-orders, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/checkout-service"]}}]
    to: [{operation: {methods: ["GET"], ports: ["8080"]}}]
  - to: [{operation: {ports: ["9090"]}}]
`})
	serverCfg := fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: shipping, name: orders-api, labels: {app: orders-api}}
transparent: {inbound: "[::]:15006", outbound: "[::]:15001"}
inbound:
  - {appPort: 8080, protocol: http}
policies: %s
`, pol)
	clientCfg := fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: default, name: checkout}
transparent: {inbound: "[::]:15006", outbound: "[::]:15001"}
outbound:
  - service: orders-api.shipping
    addresses: ["198.19.0.10:80", "[2001:2:0:1::10]:80"]
    protocol: http
    endpoints:
      - {address: "%s:8080", identity: %q}
`, server.addr, ordersID)
	for _, x := range []struct {
		h      netHost
		name   string
		idDir  string
		config string
	}{
		{server, "orders", m.identity("shipping", "orders-api"), serverCfg},
		{client, "checkout", m.identity("default", "checkout-service"), clientCfg},
	} {
		cfgPath := filepath.Join(m.dir, x.name+".yaml")
		if err := os.WriteFile(cfgPath, []byte(x.config), 0o600); err != nil {
			t.Fatal(err)
		}
		background(t, m.dir, "admin endpoints listening", "ip", "netns", "exec", x.h.name, proxyBin,
			"--static", x.idDir, "--config", cfgPath, "--admin-addr", "127.0.0.1:15000")
		waitFor(t, 10*time.Second, x.name+" ready", func() bool {
			return x.h.exec(t, "", curlBin, "-fsS", "http://127.0.0.1:15000/ready").err == nil
		})
	}

	get := func(url string) curlResult {
		r := client.exec(t, "", curlBin, "-sS", "--max-time", "10", "-w", "\n%{http_code}", url)
		out := strings.TrimRight(r.stdout, "\n")
		i := strings.LastIndex(out, "\n")
		if i < 0 {
			return curlResult{code: out, err: r.err, body: r.stderr}
		}
		return curlResult{body: out[:i], code: out[i+1:], err: r.err}
	}
	// The service's virtual IP: intercepted, mTLS, authorized by identity.
	if r := get("http://198.19.0.10/v1/orders"); r.code != "200" || strings.TrimSpace(r.body) != "orders list" {
		t.Fatalf("GET through the mesh: %+v", r)
	}
	if r := get("http://198.19.0.10/v1/orders"); r.code != "200" {
		t.Fatalf("second GET (pooled connection): %+v", r)
	}
	// The same service by its IPv6 virtual IP: ip6tables rules, IPv6
	// original destination, dual-stack capture listeners.
	if r := get("http://[2001:2:0:1::10]/v1/orders"); r.code != "200" || strings.TrimSpace(r.body) != "orders list" {
		t.Fatalf("GET through the mesh over IPv6: %+v", r)
	}
	// IPv6 cannot go around the sidecar: plaintext to the server's IPv6
	// address arrives at its sidecar like IPv4 does.
	if r := get(fmt.Sprintf("http://[%s]:9090/v1/orders", server.addr6)); r.code != "200" {
		t.Fatalf("passthrough over IPv6 to a port open to plaintext: %+v", r)
	}
	// An address outside the mesh's routes passes through as plaintext and
	// arrives at the server's sidecar as a plaintext caller, which the
	// policy allows on port 9090.
	if r := get(fmt.Sprintf("http://%s:9090/v1/orders", server.addr)); r.code != "200" {
		t.Fatalf("passthrough to a port open to plaintext: %+v", r)
	}
	// Dialling the endpoint itself rather than the service goes through
	// the mesh as well (mTLS as checkout, so the identity rule allows it).
	if r := get(fmt.Sprintf("http://%s:8080/v1/orders", server.addr)); r.code != "200" {
		t.Fatalf("GET to the endpoint address through the mesh: %+v", r)
	}
	// The server sidecar's outbound capture port listens on [::]; a caller
	// from outside must not be able to send traffic out through it.
	if r := get(fmt.Sprintf("http://%s:15001/", server.addr)); r.code == "200" {
		t.Fatalf("a remote caller reached the outbound capture port: %+v", r)
	}
	// The capture ports themselves lead nowhere: a remote caller dialling
	// the inbound one, or a local process dialling the outbound one, is
	// refused instead of being forwarded to the proxy itself (a loop that
	// would exhaust its file descriptors).
	if r := get(fmt.Sprintf("http://%s:15006/", server.addr)); r.code == "200" {
		t.Fatalf("the inbound capture port answered a direct request: %+v", r)
	}
	if r := server.exec(t, "", curlBin, "-sS", "--max-time", "5", "http://127.0.0.1:15001/"); r.err == nil {
		t.Fatalf("the outbound capture port answered a direct local request: %s", r.stdout)
	}
	metrics := server.exec(t, "", curlBin, "-fsS", "http://127.0.0.1:15000/metrics").stdout
	for _, reason := range []string{"direct connection to the inbound capture port", "direct connection to the outbound capture port"} {
		if !strings.Contains(metrics, `reason="`+reason+`"} 1`) {
			t.Errorf("the server's sidecar did not count one refusal for %q:\n%s", reason, metrics)
		}
	}
	if n := strings.Count(server.exec(t, "", "ss", "-tn").stdout, "\n"); n > 100 {
		t.Errorf("%d TCP connections in the server's namespace: a capture port is looping", n)
	}
	if !strings.Contains(metrics, `reason="connection to the outbound capture port from outside"} 1`) {
		t.Errorf("the server's sidecar did not refuse the connection to its outbound capture port:\n%s", metrics)
	}
	if !strings.Contains(metrics, `decision="allow",destination="spiffe://cluster.local/ns/shipping/sa/orders-api",direction="inbound",policy="shipping/checkout-reads-orders",source="spiffe://cluster.local/ns/default/sa/checkout-service",status_class="2xx",tls="true"} 4`) {
		t.Errorf("the server's sidecar did not count 4 mTLS requests from checkout:\n%s", metrics)
	}
	if !strings.Contains(metrics, `direction="inbound",policy="shipping/checkout-reads-orders",source="unknown",status_class="2xx",tls="false"} 2`) {
		t.Errorf("the server's sidecar did not see the 2 plaintext passthrough requests (IPv4, IPv6):\n%s", metrics)
	}
	// intercept.Cleanup undoes the rules (what a sidecar's removal runs).
	defer func() {
		for _, tool := range []string{"iptables", "ip6tables"} {
			for _, rule := range intercept.Cleanup() {
				if r := client.exec(t, "", append([]string{tool}, rule...)...); r.err != nil {
					t.Errorf("%s %s: %v %s", tool, strings.Join(rule, " "), r.err, r.stderr)
				}
			}
			if rules := client.exec(t, "", tool, "-t", "nat", "-S").stdout; strings.Contains(rules, "TRELLIS") {
				t.Errorf("%s rules left after cleanup:\n%s", tool, rules)
			}
		}
	}()
	// The sidecar forwards intercepted traffic to the address the caller
	// dialled, never to loopback: a loopback-only server stays private.
	if r := get(fmt.Sprintf("http://%s:7070/v1/orders", server.addr)); r.code == "200" {
		t.Fatalf("a loopback-only server was reachable from another host through the sidecar: %+v", r)
	}
}
