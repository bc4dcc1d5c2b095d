package proxy

import (
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// TestRuleDecisionMetrics: each decision is counted by the policy rule
// that made it, and a dry-run policy's would-be decision apart.
func TestRuleDecisionMetrics(t *testing.T) {
	iss := newIssuer(t)
	in := freeAddr(t)
	reg := prometheus.NewRegistry()
	orders := startProxy(t, ordersConfig(in, serveApp(t, answer("orders")), config.ProtocolHTTP), iss.holderFor(ordersID),
		func(o *Options) { o.Metrics = NewMetrics(reg) })
	out := freeAddr(t)
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
		Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}), iss.holderFor(checkoutID))
	mustApply(t, orders, Update{Version: "v1", Labels: map[string]string{"app": "orders-api"}, Policies: parsePolicies(t, `
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-gets, namespace: shipping}
spec:
  rules:
  - to: [{operation: {methods: [POST]}}]
  - to: [{operation: {methods: [GET]}}]
`, `
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-secret, namespace: shipping, annotations: {trellis.dev/dry-run: "true"}}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/secret]}}]
`)})
	client := &http.Client{Timeout: 10 * time.Second}
	for _, path := range []string{"/", "/secret"} {
		if code, _ := getBody(t, client, "http://"+out+path); code != 200 {
			t.Fatalf("GET %s = %d", path, code)
		}
	}
	got := map[string]float64{}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "trellis_authz_decisions_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			got[l["policy"]+"#"+l["rule"]+" "+l["decision"]+" dry="+l["dry_run"]] = m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{
		"shipping/allow-gets#1 allow dry=false": 2, // the GET rule (index 1) allowed both
		"shipping/deny-secret#0 deny dry=true":  1, // would have denied /secret
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}
