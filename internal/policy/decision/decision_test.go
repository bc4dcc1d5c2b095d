package decision

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/internal/policy"
)

func decide(t *testing.T, yaml string, in Input) Decision {
	t.Helper()
	set, err := policy.Parse("case.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	m, err := Compile(set, policy.DefaultRootNamespace)
	if err != nil {
		t.Fatal(err)
	}
	return m.Decide(in)
}

func TestSummary(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		in   Input
		want string
	}{
		// The sentence of issue 3, for the seed policy.
		{"closest ALLOW rule", seed003, input(method("GET"), path("/v1/orders")),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was allow-checkout-to-orders rule 0: method GET not in [POST]"},
		{"several mismatches", seed003, input(from("cluster.local/ns/default/sa/web"), method("GET"), path("/v2")),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was allow-checkout-to-orders rule 0: principal cluster.local/ns/default/sa/web not in [cluster.local/ns/default/sa/checkout-service]; method GET not in [POST]; path /v2 not in [/v1/orders]"},
		{"plaintext caller", seed003, input(plaintext, method("POST"), path("/v1/orders")),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was allow-checkout-to-orders rule 0: no principal (the caller is not authenticated by mTLS), required: [cluster.local/ns/default/sa/checkout-service]"},
		{"allowed", seed003, input(method("POST"), path("/v1/orders")),
			"allowed: ALLOW policy allow-checkout-to-orders rule 0 matched"},
		{"no policy", "", input(), "allowed: no authorization policy applies to shipping/orders-api"},
		{"no ALLOW policy", ap("shipping", "deny-delete", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]"), input(),
			"allowed: no DENY policy matched and no ALLOW policy applies to shipping/orders-api"},
		{"DENY from the root namespace", ap("trellis-system", "deny-all", "action: DENY\nrules:\n- {}"), input(),
			"denied: DENY policy trellis-system/deny-all rule 0 matched"},
		{"allow-nothing", ap("shipping", "allow-nothing", ""), input(),
			"denied: no ALLOW policy on shipping/orders-api matched; allow-nothing has no rules, and an ALLOW policy without rules matches nothing"},
		{"TCP", ap("shipping", "get-only", "rules:\n- to: [{operation: {methods: [GET]}}]"), input(tcp),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was get-only rule 0: uses HTTP-only fields (to[0].operation.methods), which cannot match a TCP connection"},
		{"header", ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x-tenant]', values: [acme]}]"), input(),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was p rule 0: request.headers[x-tenant] absent, required: [acme]"},
		{"negated", ap("shipping", "p", "rules:\n- to: [{operation: {notPaths: ['/admin/*']}}]"), input(path("/admin/x")),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was p rule 0: path /admin/x matches notPaths [/admin/*]"},
		{"mTLS", pa("shipping", "strict", "mtls: {mode: STRICT}"), input(plaintext),
			"denied: port 8080 requires mTLS (mode STRICT from namespace-wide PeerAuthentication shipping/strict) and the caller sent plaintext"},
		{"closest is the rule with fewest mismatches", ap("shipping", "p", "rules:\n- to: [{operation: {methods: [PUT], paths: ['/x']}}]\n- to: [{operation: {methods: [POST], paths: ['/']}}]"), input(),
			"denied: no ALLOW policy on shipping/orders-api matched; closest was p rule 1: method GET not in [POST]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := decide(t, tt.yaml, tt.in)
			if got := d.Summary(); got != tt.want {
				t.Errorf("Summary()\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestNotes(t *testing.T) {
	yaml := doc(seed003,
		pa("shipping", "disable", "mtls: {mode: DISABLE}"),
		pa("shipping", "b-strict", "mtls: {mode: STRICT}"))
	d := decide(t, yaml, input(workload("shipping", "orders-api"), path("/v1/../v1/orders?x=1")))
	want := []string{
		"PeerAuthentication shipping/disable is ignored: an older policy of the same scope applies (oldest wins)",
		"path /v1/../v1/orders?x=1 is matched as /v1/orders (query removed, dot segments resolved)",
		"the workload has no labels, so policies with a selector do not apply to it: shipping/allow-checkout-to-orders",
	}
	if diff := cmp.Diff(want, d.Notes); diff != "" {
		t.Errorf("notes (-want +got):\n%s", diff)
	}
}

func TestReportJSON(t *testing.T) {
	d := decide(t, doc(seed003, apDryRun(policy.DryRunAnnotation, "shipping", "deny-get", "action: DENY\nrules:\n- to: [{operation: {methods: [GET]}}]")),
		input(method("GET"), path("/v1/orders")))
	b, err := json.Marshal(d.Report())
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	// The fields the issue promises scripts.
	want := map[string]any{
		"decision": "deny",
		"mtls":     map[string]any{"mode": "PERMISSIVE", "policy": nil},
		"authorization": map[string]any{
			"decision": "deny", "policy": nil, "rule": nil,
			"reason": "no ALLOW policy on shipping/orders-api matched; closest was allow-checkout-to-orders rule 0: method GET not in [POST]",
		},
		"dryRun": []any{map[string]any{"policy": "shipping/deny-get", "action": "DENY", "matched": true, "rule": 0.0, "effect": "would deny"}},
	}
	pick := map[string]any{}
	for k, w := range want {
		switch w := w.(type) {
		case map[string]any:
			sub := map[string]any{}
			for kk := range w {
				sub[kk] = got[k].(map[string]any)[kk]
			}
			pick[k] = sub
		default:
			pick[k] = got[k]
		}
	}
	if diff := cmp.Diff(want, pick); diff != "" {
		t.Errorf("JSON (-want +got):\n%s\n%s", diff, b)
	}
}

func TestStoreKeepsPreviousOnError(t *testing.T) {
	dir := t.TempDir()
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := NewStore(policy.DefaultRootNamespace)
	if s.Current() != nil {
		t.Fatal("new store has policies")
	}
	write(seed003)
	if err := s.Reload(dir); err != nil {
		t.Fatal(err)
	}
	first := s.Current()
	write(strings.Replace(seed003, "mode: STRICT", "mode: STRIKT", 1))
	err := s.Reload(dir)
	if !errors.Is(err, policy.ErrInvalid) || !strings.Contains(err.Error(), "previous policies stay in force") {
		t.Errorf("Reload error = %v", err)
	}
	if s.Current() != first {
		t.Error("a failed reload replaced the policies in force")
	}
	write(ap("shipping", "allow-nothing", ""))
	if err := s.Reload(dir); err != nil {
		t.Fatal(err)
	}
	if got := s.Current().Decide(input()).Allowed; got {
		t.Error("the new policies are not in force")
	}
}
