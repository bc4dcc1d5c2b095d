package authz

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

// TestIndexAgreesWithScan compares Evaluate, which skips rules through the
// principal and namespace index, with Explain, which scans every rule, over
// random policies and requests drawn from a small vocabulary so that they
// often match.
func TestIndexAgreesWithScan(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	pick := func(vals ...string) string { return vals[rnd.IntN(len(vals))] }
	list := func(gen func() string) string {
		n := 1 + rnd.IntN(3)
		var out []string
		for range n {
			out = append(out, fmt.Sprintf("%q", gen()))
		}
		return "[" + strings.Join(out, ", ") + "]"
	}
	ns := func() string { return pick("a", "b", "c") }
	principal := func() string {
		return pick("cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "cluster.local/ns/c/sa/x", "cluster.local/ns/a/*", "*/sa/x", "*")
	}
	source := func() string {
		var fields []string
		for len(fields) == 0 {
			if rnd.IntN(2) == 0 {
				fields = append(fields, pick("principals", "notPrincipals")+": "+list(principal))
			}
			if rnd.IntN(2) == 0 {
				fields = append(fields, pick("namespaces", "notNamespaces")+": "+list(ns))
			}
		}
		return "{source: {" + strings.Join(fields, ", ") + "}}"
	}
	rule := func() string {
		var parts []string
		if rnd.IntN(4) > 0 {
			n := 1 + rnd.IntN(2)
			var srcs []string
			for range n {
				srcs = append(srcs, source())
			}
			parts = append(parts, "from: ["+strings.Join(srcs, ", ")+"]")
		}
		if rnd.IntN(2) == 0 {
			parts = append(parts, "to: [{operation: {"+pick("methods", "notMethods")+": "+list(func() string { return pick("GET", "POST") })+"}}]")
		}
		if rnd.IntN(4) == 0 {
			parts = append(parts, "when: [{key: "+pick("source.principal", "source.namespace")+", values: "+list(principal)+"}]")
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	for iter := range 300 {
		var docs []string
		for i := range 1 + rnd.IntN(12) {
			action := pick("ALLOW", "ALLOW", "DENY", "AUDIT")
			var rules []string
			for range rnd.IntN(4) {
				rules = append(rules, rule())
			}
			dry := pick("false", "false", "true")
			docs = append(docs, fmt.Sprintf("apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p%d, namespace: shipping, annotations: {trellis.dev/dry-run: %q}}\nspec: {action: %s, rules: [%s]}\n",
				i, dry, action, strings.Join(rules, ", ")))
		}
		yaml := strings.Join(docs, "---\n")
		e := compile(t, yaml).ForWorkload(orders)
		for range 20 {
			r := Request{HTTP: rnd.IntN(4) > 0, Port: 8080, Method: pick("GET", "POST"), Path: "/", IP: netip.MustParseAddr("10.0.0.1"), Headers: http.Header{}}
			if rnd.IntN(5) > 0 {
				n := ns()
				r.Principal, r.Namespace = fmt.Sprintf("cluster.local/ns/%s/sa/%s", n, pick("x", "y")), n
			}
			got, want := e.Evaluate(&r), e.Explain(&r).Result
			if got != want {
				t.Fatalf("iteration %d, request %+v:\nEvaluate %+v\nExplain  %+v\npolicies:\n%s", iter, r, got, want, yaml)
			}
		}
	}
}
