package policy_test

import (
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
)

// FuzzParse feeds arbitrary bytes to the loader. It must never panic, and
// whatever it accepts must compile and evaluate, with explanations agreeing
// with decisions.
func FuzzParse(f *testing.F) {
	for _, dir := range []string{
		filepath.Join("..", "..", "examples", "policies"),
		filepath.Join("testdata", "mixed"),
		filepath.Join("testdata", "bad"),
	} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.y*ml"))
		for _, name := range files {
			b, err := os.ReadFile(name)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
	for _, s := range []string{
		"",
		"---\n---\n",
		"apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - to: [{operation: {paths: ['/a/{*}/{**}'], ports: ['80']}}]\n    when: [{key: 'request.headers[x]', values: ['*'], notValues: [b*]}]\n",
		"apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {80: {mode: DISABLE}}}\n",
		"a: &a [*a, *a]\n",
		"apiVersion: v1\nkind: List\nitems: [{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}}]\n",
		"apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: DENY, rules: [{from: [{source: {notIpBlocks: ['10.0.0.0/8'], namespaces: ['*']}}]}]}\n",
		"apiVersion: networking.trellis.dev/v1\nkind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [a.example.com], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}], resolution: STATIC, endpoints: [{address: 127.0.0.1, ports: {http: 8443}}]}\n---\n" +
			"apiVersion: networking.trellis.dev/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: a.example.com, trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: c, privateKey: k, caCertificates: ca, sni: a.example.com, subjectAltNames: [a.example.com]}}}\n---\n" +
			"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec: {hosts: [a.example.com], http: [{match: [{port: 80}], route: [{destination: {host: a.example.com, port: {number: 80}}}]}]}\n",
		"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: n}\nspec: {parentRefs: [{name: g}], hostnames: [a.example.com], rules: [{matches: [{path: {type: Exact, value: /x}}], backendRefs: [{name: s, port: 80}]}]}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := policy.Parse("fuzz.yaml", data)
		if err != nil {
			if set != nil {
				t.Fatal("Parse returned a set and an error")
			}
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		for _, pa := range set.PeerAuthentications {
			if errs, _ := pa.Validate(); len(errs) > 0 {
				t.Fatalf("accepted %s does not validate: %v", pa.Metadata.Ref(), errs)
			}
			wl := policy.Workload{Namespace: pa.Metadata.Namespace, Labels: selectorLabels(pa.Spec.Selector)}
			for port := range pa.Spec.PortLevelMTLS {
				if m := mtls.Resolve(set.PeerAuthentications, policy.DefaultRootNamespace, wl, port).Mode; m == policy.ModeUnset {
					t.Fatal("resolved mode is UNSET")
				}
			}
		}
		x, err := authz.Compile(set.AuthorizationPolicies, policy.DefaultRootNamespace)
		if err != nil {
			t.Fatalf("accepted policies do not compile: %v", err)
		}
		for _, ap := range set.AuthorizationPolicies {
			if errs, _ := ap.Validate(); len(errs) > 0 {
				t.Fatalf("accepted %s does not validate: %v", ap.Metadata.Ref(), errs)
			}
			wl := policy.Workload{Namespace: ap.Metadata.Namespace, Labels: selectorLabels(ap.Spec.Selector)}
			e := x.ForWorkload(wl)
			for _, r := range []authz.Request{
				{HTTP: true, Port: 80, Principal: "cluster.local/ns/a/sa/b", Namespace: "a", IP: netip.MustParseAddr("10.1.2.3"),
					Method: "GET", Path: "/a/b/../c?x", Host: "example.com", Headers: http.Header{"X": {"b1"}}},
				{HTTP: false, Port: 5432},
			} {
				res := e.Evaluate(&r)
				ex := e.Explain(&r)
				if ex.Result != res {
					t.Fatalf("Explain result %+v differs from Evaluate %+v", ex.Result, res)
				}
				checkTraces(t, ex, res)
			}
		}
	})
}

func selectorLabels(s *policy.Selector) map[string]string {
	if s == nil {
		return nil
	}
	return s.MatchLabels
}

// checkTraces verifies that the per-rule explanation agrees with the
// decision: the deciding policy's deciding rule matched, and it is the first
// policy of its action that matched.
func checkTraces(t *testing.T, ex authz.Explanation, res authz.Result) {
	t.Helper()
	for _, pt := range ex.Policies {
		first := -1
		for _, rt := range pt.Rules {
			if rt.Matched != (len(rt.Mismatches) == 0 && len(rt.HTTPOnly) == 0) {
				t.Fatalf("rule %d of %s: matched=%v with mismatches %v", rt.Index, pt.Policy.Ref, rt.Matched, rt.Mismatches)
			}
			if rt.Matched && first < 0 {
				first = rt.Index
			}
		}
		if first != pt.Rule {
			t.Fatalf("%s: first matching rule %d, trace says %d", pt.Policy.Ref, first, pt.Rule)
		}
		if pt.Policy == res.Policy && pt.Rule != res.Rule {
			t.Fatalf("%s decided with rule %d but its trace says %d", pt.Policy.Ref, res.Rule, pt.Rule)
		}
	}
}
