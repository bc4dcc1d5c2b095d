package proxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// connect opens a CONNECT tunnel to target through the HTTP proxy at
// proxyAddr and returns the connection and the proxy's reply status.
func connect(t *testing.T, proxyAddr, target string) (net.Conn, int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode == http.StatusOK && br.Buffered() > 0 {
		t.Fatalf("the proxy sent %d bytes after its reply to CONNECT", br.Buffered())
	}
	return c, resp.StatusCode
}

// TestHTTPProxyListener: an application that uses its sidecar as HTTP
// proxy (HTTP_PROXY) reaches mesh services by name or virtual IP over
// mTLS, reaches anything else directly, and can open CONNECT tunnels to
// both.
func TestHTTPProxyListener(t *testing.T) {
	iss := newIssuer(t)
	httpIn, tcpIn := freeAddr(t), freeAddr(t)
	serverCfg := ordersConfig(httpIn, serveApp(t, answer("orders")), config.ProtocolHTTP)
	serverCfg.Inbound = append(serverCfg.Inbound, config.Inbound{Listen: tcpIn, AppPort: echoServer(t), Protocol: config.ProtocolTCP})
	startProxy(t, serverCfg, iss.holderFor(ordersID))
	outside := serveApp(t, answer("outside"))
	outsideEcho := echoServer(t)

	proxyAddr := freeAddr(t)
	cfg := checkoutConfig()
	cfg.HTTPProxy = proxyAddr
	reg := prometheus.NewRegistry()
	checkout := startProxy(t, cfg, iss.holderFor(checkoutID), func(o *Options) { o.Metrics = NewMetrics(reg) })
	mustApply(t, checkout, Update{Version: "v1", Destinations: []config.Outbound{
		{Service: "orders-api.shipping", Port: 80, Protocol: config.ProtocolHTTP, Addresses: []string{"198.19.0.1:80"},
			Endpoints: []config.Endpoint{{Address: httpIn, Identity: ordersID}}},
		{Service: "echo.shipping", Port: 7, Protocol: config.ProtocolTCP, Endpoints: []config.Endpoint{{Address: tcpIn, Identity: ordersID}}},
		{Service: "empty.shipping", Port: 80, Protocol: config.ProtocolHTTP},
	}})

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyAddr})}}
	for _, tc := range []struct {
		url      string
		code     int
		contains string
	}{
		{"http://orders-api.shipping/v1/orders", 200, "orders"},
		{"http://orders-api.shipping:80/", 200, "orders"},
		{"http://Orders-API.shipping.svc.cluster.local./", 200, "orders"},
		{"http://orders-api.shipping.svc/", 200, "orders"},
		{"http://198.19.0.1/", 200, "orders"},
		{"http://empty.shipping/", 503, "empty.shipping unavailable: it has no endpoints"},
		{fmt.Sprintf("http://127.0.0.1:%d/", outside), 200, "outside"},
		{"http://" + proxyAddr + "/", http.StatusLoopDetected, "would loop"},
		{"http://localhost:" + strings.Split(proxyAddr, ":")[1] + "/", http.StatusLoopDetected, "would loop"},
	} {
		code, body := getBody(t, client, tc.url)
		if code != tc.code || !strings.Contains(body, tc.contains) {
			t.Errorf("GET %s through the proxy: %d %q, want %d containing %q", tc.url, code, body, tc.code, tc.contains)
		}
	}

	// A request in origin form names no destination.
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if code, body := rawGet(t, c, bufio.NewReader(c)); code != http.StatusBadRequest || !strings.Contains(body, "must name its destination") {
		t.Errorf("origin-form request: %d %q, want 400 saying what to send", code, body)
	}

	// Tunnels: to a mesh service over mTLS, to anything else directly.
	for _, target := range []string{"echo.shipping:7", fmt.Sprintf("127.0.0.1:%d", outsideEcho)} {
		tunnel, code := connect(t, proxyAddr, target)
		if code != http.StatusOK {
			t.Fatalf("CONNECT %s: %d", target, code)
		}
		if err := pingPong(tunnel); err != nil {
			t.Fatalf("through the tunnel to %s: %v", target, err)
		}
	}
	for target, want := range map[string]int{
		"empty.shipping:80":   http.StatusServiceUnavailable,
		"echo.shipping":       http.StatusBadRequest, // no port
		proxyAddr:             http.StatusLoopDetected,
		"127.0.0.1:1":         http.StatusServiceUnavailable, // refused
		"orders-api.shipping": http.StatusBadRequest,
	} {
		if _, code := connect(t, proxyAddr, target); code != want {
			t.Errorf("CONNECT %s: %d, want %d", target, code, want)
		}
	}
	// REGISTRY_ONLY: what is neither a mesh service nor a ServiceEntry host
	// is refused, and counted.
	mustApply(t, checkout, Update{Version: "v2", RegistryOnly: true, Destinations: []config.Outbound{
		{Service: "orders-api.shipping", Port: 80, Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: httpIn, Identity: ordersID}}},
	}})
	if code, body := getBody(t, client, fmt.Sprintf("http://127.0.0.1:%d/", outside)); code != http.StatusBadGateway || !strings.Contains(body, "REGISTRY_ONLY") {
		t.Errorf("outside the registry: %d %q, want 502 naming REGISTRY_ONLY", code, body)
	}
	if _, code := connect(t, proxyAddr, fmt.Sprintf("127.0.0.1:%d", outsideEcho)); code != http.StatusBadGateway {
		t.Errorf("CONNECT outside the registry: %d, want 502", code)
	}
	if code, _ := getBody(t, client, "http://orders-api.shipping/"); code != 200 {
		t.Errorf("a mesh service under REGISTRY_ONLY: %d", code)
	}

	// The edges are told apart: through the mesh, and passed through.
	var out strings.Builder
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "trellis_requests_total" || f.GetName() == "trellis_tcp_connections_total" {
			for _, m := range f.GetMetric() {
				out.WriteString(f.GetName())
				for _, l := range m.GetLabel() {
					fmt.Fprintf(&out, " %s=%s", l.GetName(), l.GetValue())
				}
				out.WriteString("\n")
			}
		}
	}
	for _, want := range []string{
		"trellis_requests_total decision= destination=spiffe://cluster.local/ns/shipping/sa/orders-api direction=outbound",
		"trellis_requests_total decision= destination=passthrough direction=outbound",
		"trellis_tcp_connections_total decision=allow destination=spiffe://cluster.local/ns/shipping/sa/orders-api direction=outbound",
		"trellis_tcp_connections_total decision=allow destination=passthrough direction=outbound",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("metrics lack %s in\n%s", want, out.String())
		}
	}
}
