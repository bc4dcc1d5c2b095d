package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

func TestGatewayRouteOrder(t *testing.T) {
	routes := compileGatewayRoutes([]GatewayRoute{
		{Route: "any-root", Path: "/"},
		{Route: "any-api", Path: "/api"},
		{Route: "host-root", Hostnames: []string{"Shop.Example.Test."}, Path: "/"},
		{Route: "host-exact", Hostnames: []string{"shop.example.test"}, Path: "/api/login", Exact: true},
		{Route: "host-api", Hostnames: []string{"shop.example.test"}, Path: "/api/"},
	})
	for _, tc := range []struct{ host, path, want string }{
		{"shop.example.test", "/api/login", "host-exact"},
		{"shop.example.test", "/api/orders", "host-api"},
		{"shop.example.test", "/api", "host-api"},
		{"shop.example.test", "/apix", "host-root"},
		{"other.example.test", "/api/x", "any-api"},
		{"other.example.test", "/apix", "any-root"},
	} {
		got := ""
		for _, r := range routes {
			if r.matches(tc.host, tc.path) {
				got = r.Route
				break
			}
		}
		if got != tc.want {
			t.Errorf("%s%s → %s, want %s", tc.host, tc.path, got, tc.want)
		}
	}
}

// TestGateway: a gateway terminates HTTPS with its certificate files and
// sends requests, by route, over mTLS to the mesh service, which sees the
// gateway's identity; what no route takes is a 404.
func TestGateway(t *testing.T) {
	iss := newIssuer(t)
	const gatewayID = "spiffe://cluster.local/ns/edge/sa/ingress"
	in := freeAddr(t)
	seen := make(chan string, 10)
	startProxy(t, ordersConfig(in, serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Host + r.URL.Path
		_, _ = w.Write([]byte("orders"))
	})), config.ProtocolHTTP), iss.holderFor(ordersID))

	pki := newTestPKI(t, "shop CA")
	cert, key := pki.issue("gateway", "shop.example.test", []string{"shop.example.test"}, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	httpsAddr, httpAddr := freeAddr(t), freeAddr(t)
	cfg := &config.Config{APIVersion: "trellis.dev/v1", Kind: "ProxyConfig", Workload: config.Workload{Namespace: "edge", Name: "ingress"},
		Gateway: &config.Gateway{Listeners: []config.GatewayListener{
			{Listen: httpsAddr, Protocol: "HTTPS", Certificate: cert, PrivateKey: key},
			{Listen: httpAddr, Protocol: "HTTP"},
		}}}
	gw := startProxy(t, cfg, iss.holderFor(gatewayID))
	mustApply(t, gw, Update{Version: "v1",
		Destinations:  []config.Outbound{{Service: "orders-api.shipping", Port: 80, Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}},
		GatewayRoutes: []GatewayRoute{{Route: "web/shop", Hostnames: []string{"shop.example.test"}, Path: "/api", Service: "orders-api.shipping", Port: 80}},
	})

	roots := x509.NewCertPool()
	roots.AddCert(pki.cert)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "shop.example.test"},
	}}
	req, _ := http.NewRequest(http.MethodGet, "https://"+httpsAddr+"/api/orders", nil)
	req.Host = "shop.example.test"
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || <-seen != "shop.example.test/api/orders" {
		t.Fatalf("HTTPS through the gateway: %d", resp.StatusCode)
	}
	for _, tc := range []struct {
		url, host string
		code      int
		body      string
	}{
		{"http://" + httpAddr + "/api/x", "shop.example.test", 200, "orders"},
		{"http://" + httpAddr + "/other", "shop.example.test", 404, "no HTTPRoute for shop.example.test/other"},
		{"http://" + httpAddr + "/api/x", "elsewhere.example.test", 404, "no HTTPRoute"},
		// Matched after normalization, as the callee's sidecar will see it.
		{"http://" + httpAddr + "/api/../other", "shop.example.test", 404, "no HTTPRoute for shop.example.test/other"},
		{"http://" + httpAddr + "/api/%2e%2e/other", "shop.example.test", 404, "no HTTPRoute for shop.example.test/other"},
	} {
		req, _ := http.NewRequest(http.MethodGet, tc.url, nil)
		req.Host = tc.host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.body) {
			t.Errorf("%s (Host %s): %d %q, want %d with %q", tc.url, tc.host, resp.StatusCode, body, tc.code, tc.body)
		}
	}
}
