package authz

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/internal/policy"
)

var orders = policy.Workload{Namespace: "shipping", Name: "orders-api", Labels: map[string]string{"app": "orders-api"}}

func compile(t testing.TB, yaml string) *Index {
	t.Helper()
	set, err := policy.Parse("t.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	x, err := Compile(set.AuthorizationPolicies, policy.DefaultRootNamespace)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func TestForWorkloadSelectsPolicies(t *testing.T) {
	x := compile(t, `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: shipping}
spec: {action: DENY}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shipping}
spec: {selector: {matchLabels: {app: orders-api}}}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shipping}
spec: {selector: {matchLabels: {app: web}}}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: billing}
spec: {}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: trellis-system, annotations: {trellis.dev/dry-run: "true"}}
spec: {action: AUDIT}
`)
	e := x.ForWorkload(orders)
	refs := func(ps []*Policy) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.Ref)
		}
		return out
	}
	got := map[string][]string{"deny": refs(e.deny), "allow": refs(e.allow), "audit": refs(e.audit), "dryAudit": refs(e.dryAudit)}
	want := map[string][]string{"deny": {"shipping/ns-wide"}, "allow": {"shipping/orders"}, "audit": nil, "dryAudit": {"trellis-system/mesh"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("policies (-want +got):\n%s", diff)
	}
}

func TestExplainMismatches(t *testing.T) {
	x := compile(t, `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shipping}
spec:
  rules:
  - from:
    - source: {principals: [cluster.local/ns/a/sa/a], namespaces: [a]}
    - source: {principals: [cluster.local/ns/b/sa/b]}
    to:
    - operation: {ports: ["9090"], hosts: [api.example.com]}
    when:
    - {key: source.ip, values: [10.0.0.0/8]}
    - {key: "request.headers[x-user]", values: [alice], notValues: [bob]}
`)
	r := Request{HTTP: true, Port: 8080, Principal: "cluster.local/ns/c/sa/c", Namespace: "c", Method: "GET", Path: "/", Host: "other.example.com",
		Headers: http.Header{"X-User": {"bob"}}}
	ex := x.ForWorkload(orders).Explain(&r)
	want := []Mismatch{
		{"from[1].source.principals", "principal cluster.local/ns/c/sa/c not in [cluster.local/ns/b/sa/b]"},
		{"to[0].operation.ports", "port 8080 not in [9090]"},
		{"to[0].operation.hosts", "host other.example.com not in [api.example.com]"},
		{"when[0].values", "source.ip unknown, required: [10.0.0.0/8]"},
		{"when[1].values", `request.headers[x-user] "bob" not in [alice]`},
		{"when[1].notValues", `request.headers[x-user] "bob" matches notValues [bob]`},
	}
	if diff := cmp.Diff(want, ex.Policies[0].Rules[0].Mismatches); diff != "" {
		t.Errorf("mismatches (-want +got):\n%s", diff)
	}
}

// benchPolicies builds n policies that all apply to shipping/orders-api: a
// tenth DENY, the rest ALLOW with two rules each, and a request that only
// the last ALLOW policy's last rule matches, so every policy is evaluated.
func benchPolicies(n int) string {
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteString("---\n")
		}
		fmt.Fprintf(&b, "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p%03d, namespace: shipping}\nspec:\n  selector: {matchLabels: {app: orders-api}}\n", i)
		if i%10 == 0 {
			fmt.Fprintf(&b, `  action: DENY
  rules:
  - from: [{source: {notNamespaces: [default, shipping, "ns*", "x%d"]}}]
  - to: [{operation: {methods: [DELETE], paths: ["/admin/*"]}}]
    when: [{key: "request.headers[x-debug]", values: ["on"]}]
`, i)
			continue
		}
		fmt.Fprintf(&b, `  rules:
  - from: [{source: {principals: ["cluster.local/ns/ns%d/sa/client"]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/v1/resource%d/*"]}}]
  - from: [{source: {namespaces: [ns%d], ipBlocks: [10.%d.0.0/16]}}]
    to: [{operation: {methods: [POST], paths: ["/v1/orders/{*}/items"], ports: ["8080"]}}]
    when: [{key: "request.headers[x-tenant]", values: [tenant-%d]}]
`, i, i, i, i%256, i)
	}
	return b.String()
}

func benchRequest(n int) Request {
	last := n - 1
	return Request{
		HTTP: true, Port: 8080,
		Principal: fmt.Sprintf("cluster.local/ns/ns%d/sa/client", last), Namespace: fmt.Sprintf("ns%d", last),
		IP:     netip.MustParseAddr(fmt.Sprintf("10.%d.1.2", last%256)),
		Method: "POST", Path: "/v1/orders/42/items", Host: "orders-api.shipping.svc.cluster.local",
		Headers: http.Header{"X-Tenant": {fmt.Sprintf("tenant-%d", last)}, "User-Agent": {"bench"}},
	}
}

func TestBenchmarkRequestIsAllowedByTheLastPolicy(t *testing.T) {
	e := compile(t, benchPolicies(100)).ForWorkload(orders)
	r := benchRequest(100)
	res := e.Evaluate(&r)
	if !res.Allowed || res.Policy == nil || res.Policy.Ref != "shipping/p099" || res.Rule != 1 {
		t.Fatalf("result = %+v", res)
	}
	if n := len(e.deny) + len(e.allow); n != 100 {
		t.Fatalf("%d policies apply, want 100", n)
	}
}

func TestEvaluateDoesNotAllocate(t *testing.T) {
	e := compile(t, benchPolicies(100)).ForWorkload(orders)
	r := benchRequest(100)
	tcp := Request{Port: 8080, Principal: r.Principal, Namespace: r.Namespace}
	if allocs := testing.AllocsPerRun(200, func() { e.Evaluate(&r); e.Evaluate(&tcp) }); allocs != 0 {
		t.Errorf("Evaluate allocated %v times per run", allocs)
	}
}

// BenchmarkEvaluate measures one HTTP authorization decision with 100
// policies on the workload, every one of which is evaluated.
func BenchmarkEvaluate(b *testing.B) {
	for _, n := range []int{10, 100} {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			e := compile(b, benchPolicies(n)).ForWorkload(orders)
			r := benchRequest(n)
			b.ReportAllocs()
			for b.Loop() {
				if !e.Evaluate(&r).Allowed {
					b.Fatal("denied")
				}
			}
		})
	}
}

// unkeyedPolicies builds n ALLOW policies whose rules name no exact caller
// (paths, methods, prefixes), so the index cannot skip any of them: the
// worst case, a linear scan.
func unkeyedPolicies(n int) string {
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteString("---\n")
		}
		fmt.Fprintf(&b, `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: u%03d, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/team%d/*"]}}]
    to: [{operation: {methods: [GET], paths: ["/v1/resource%d/*"]}}]
  - to: [{operation: {methods: [POST], paths: ["/v1/orders/{*}/items%d"], ports: ["8080"]}}]
`, i, i, i, i)
	}
	return b.String()
}

func BenchmarkEvaluateUnindexed(b *testing.B) {
	e := compile(b, unkeyedPolicies(100)).ForWorkload(orders)
	r := Request{HTTP: true, Port: 8080, Principal: "cluster.local/ns/team99/sa/client", Namespace: "team99",
		Method: "POST", Path: "/v1/orders/42/items99", Headers: http.Header{}}
	if res := e.Evaluate(&r); !res.Allowed || res.Policy.Ref != "shipping/u099" {
		b.Fatalf("result = %+v", res)
	}
	b.ReportAllocs()
	for b.Loop() {
		e.Evaluate(&r)
	}
}
