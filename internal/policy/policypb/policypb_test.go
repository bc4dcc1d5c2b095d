package policypb_test

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/policypb"
)

// everyField sets every field of both kinds, with the aliases and the
// shapes that convert lossily (mtls: {}, empty selectors and maps).
const everyField = `apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata:
  name: orders-api
  namespace: shipping
  labels: {team: payments, app.kubernetes.io/part-of: shop}
  annotations: {owner: payments@example.com}
  creationTimestamp: "2024-05-01T14:00:00.123456789+02:00"
spec:
  selector:
    matchLabels: {app: orders-api, tier: backend}
  mtls: {mode: STRICT}
  portLevelMtls:
    9090: {mode: PERMISSIVE}
    "8443": {mode: DISABLE}
    15000: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shipping, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  selector: {matchLabels: {}}
  mtls: {}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: no-spec, labels: {}}
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: gateway, namespace: trellis-system}
spec:
  selector: {matchLabels: {app: gateway}}
  mtls: {mode: DISABLE}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: shipping
  annotations: {trellis.dev/dry-run: "true"}
spec:
  selector: {matchLabels: {app: orders-api}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/checkout", "*/sa/admin"]
        notPrincipals: ["cluster.local/ns/shipping/*"]
        namespaces: ["default", "team-*"]
        notNamespaces: ["kube-system"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]
        notIpBlocks: ["10.1.0.0/16"]
    - source: {namespaces: ["batch"]}
    to:
    - operation:
        hosts: ["orders.example.com", "*.internal"]
        notHosts: ["admin.example.com"]
        ports: ["8080", "443"]
        notPorts: ["9090"]
        methods: ["POST", "DELETE"]
        notMethods: ["GET"]
        paths: ["/v1/admin/*", "/v1/orders/{*}/refund", "/v2/{**}"]
        notPaths: ["/v1/admin/health"]
    - operation: {paths: ["*/debug"]}
    when:
    - key: request.headers[x-user-id]
      values: ["*"]
      notValues: ["anonymous"]
    - key: source.principal
      values: ["cluster.local/ns/default/sa/checkout"]
    - key: source.namespace
      notValues: ["kube-*"]
    - key: source.ip
      values: ["10.0.0.0/8"]
    - key: destination.port
      values: ["8080"]
  - to:
    - operation: {methods: ["get"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-all
  namespace: trellis-system
  annotations: {istio.io/dry-run: "false"}
  creationTimestamp: "2024-05-01T12:00:00Z"
spec:
  selector: {}
  action: AUDIT
  rules:
  - {}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: default, namespace: shipping}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/checkout"]}}]
    to: []
    when: []
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shipping}
spec: {rules: []}
`

// list is a v1 List, whose items share one document and so one source.
const list = `apiVersion: v1
kind: List
items:
- apiVersion: security.trellis.dev/v1
  kind: AuthorizationPolicy
  metadata: {name: b, namespace: a}
  spec: {action: DENY, rules: [{to: [{operation: {notPorts: ["22"]}}]}]}
- apiVersion: security.trellis.dev/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: b}
  spec: {rules: [{when: [{key: "request.headers[:authority]", values: ["x"]}]}]}
- apiVersion: security.trellis.dev/v1
  kind: PeerAuthentication
  metadata: {name: a, namespace: a}
`

// roundTripOptions compare a loaded set with its conversion. What they
// ignore differs legitimately:
var roundTripOptions = cmp.Options{
	// The message carries no apiVersion (ToSet writes policy.APIVersion for
	// every alias, checked separately) and the location only as text.
	cmpopts.IgnoreFields(policy.PeerAuthentication{}, "APIVersion", "Location"),
	cmpopts.IgnoreFields(policy.AuthorizationPolicy{}, "APIVersion", "Location"),
	// Skipped documents and file names concern the files, not the
	// resources, and are not sent; warnings carry file positions and are
	// compared without them.
	cmpopts.IgnoreFields(policy.Set{}, "Skipped", "Warnings", "Files", "Sources"),
	// Evaluation only takes len of and ranges over lists and maps, and
	// Selector.Empty treats a nil and an empty selector alike.
	cmpopts.EquateEmpty(),
	// "mtls: {}" and no mtls are both UNSET.
	cmp.Comparer(func(a, b *policy.MTLS) bool { return a.Effective() == b.Effective() }),
}

func TestRoundTrip(t *testing.T) {
	parse := func(name, data string) func() (*policy.Set, error) {
		return func() (*policy.Set, error) { return policy.Parse(name, []byte(data)) }
	}
	tests := []struct {
		name string
		load func() (*policy.Set, error)
	}{
		{"examples", func() (*policy.Set, error) {
			return policy.LoadDir(filepath.Join("..", "..", "..", "examples", "policies"))
		}},
		{"testdata/mixed", func() (*policy.Set, error) { return policy.LoadDir(filepath.Join("..", "testdata", "mixed")) }},
		{"testdata/bad/a-good.yaml", func() (*policy.Set, error) {
			return policy.LoadFiles(filepath.Join("..", "testdata", "bad", "a-good.yaml"))
		}},
		{"every field", parse("every-field.yaml", everyField)},
		{"list", parse("list.yaml", list)},
		{"empty", parse("empty.yaml", "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := tt.load()
			if err != nil {
				t.Fatal(err)
			}
			got, err := policypb.ToSet(overTheWire(t, want))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got, roundTripOptions); diff != "" {
				t.Errorf("round trip (-loaded +converted):\n%s", diff)
			}
			if diff := cmp.Diff(warnings(want), warnings(got)); diff != "" {
				t.Errorf("warnings (-loaded +converted):\n%s", diff)
			}
			for _, pa := range got.PeerAuthentications {
				if pa.APIVersion != policy.APIVersion {
					t.Errorf("%s: apiVersion %q, want %q", pa.Metadata.Ref(), pa.APIVersion, policy.APIVersion)
				}
			}
			for _, ap := range got.AuthorizationPolicies {
				if ap.APIVersion != policy.APIVersion {
					t.Errorf("%s: apiVersion %q, want %q", ap.Metadata.Ref(), ap.APIVersion, policy.APIVersion)
				}
			}
		})
	}
}

// overTheWire converts a set and sends it through proto encoding, as the
// control plane does.
func overTheWire(t *testing.T, set *policy.Set) ([]*discoveryv1.PeerAuthentication, []*discoveryv1.AuthorizationPolicy) {
	t.Helper()
	pas, aps := policypb.FromSet(set)
	b, err := proto.Marshal(&discoveryv1.Update{PeerAuthentications: pas, AuthorizationPolicies: aps})
	if err != nil {
		t.Fatal(err)
	}
	var u discoveryv1.Update
	if err := proto.Unmarshal(b, &u); err != nil {
		t.Fatal(err)
	}
	return u.PeerAuthentications, u.AuthorizationPolicies
}

// warnings lists a set's warnings without their positions, which differ:
// the loader orders them by file and the conversion by namespace and name.
func warnings(set *policy.Set) []string {
	var out []string
	for _, w := range set.Warnings {
		out = append(out, w.Resource+": "+w.Field+": "+w.Message)
	}
	slices.Sort(out)
	return out
}

// TestLocation checks that a resource's location travels as the text the
// loader's errors use, and that ToSet's problems and warnings name it.
func TestLocation(t *testing.T) {
	tests := []struct {
		loc  policy.Location
		want string
	}{
		{policy.Location{File: "mesh.yaml", Document: 2, Line: 12}, "mesh.yaml: document 2 (line 12)"},
		{policy.Location{File: "mesh.yaml", Document: 2}, "mesh.yaml: document 2"},
		{policy.Location{File: "mesh.yaml: document 2 (line 12)"}, "mesh.yaml: document 2 (line 12)"},
		{policy.Location{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			ap := &policy.AuthorizationPolicy{
				Metadata: policy.Metadata{Name: "a", Namespace: "b"},
				Spec:     policy.AuthorizationPolicySpec{Rules: []policy.Rule{{To: []policy.To{{Operation: &policy.Operation{Methods: []string{"get"}}}}}}},
				Location: tt.loc,
			}
			_, aps := policypb.FromSet(&policy.Set{AuthorizationPolicies: []*policy.AuthorizationPolicy{ap}})
			if got := aps[0].GetMetadata().GetSource(); got != tt.want {
				t.Errorf("source = %q, want %q", got, tt.want)
			}
			set, err := policypb.ToSet(nil, aps)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(policy.Location{File: tt.want}, set.AuthorizationPolicies[0].Location); diff != "" {
				t.Errorf("location (-want +got):\n%s", diff)
			}
			// A warning names the source, or the entry without one.
			wantFile := tt.want
			if wantFile == "" {
				wantFile = "authorization_policies[0]"
			}
			if len(set.Warnings) != 1 || set.Warnings[0].File != wantFile || set.Warnings[0].Resource != "AuthorizationPolicy b/a" {
				t.Errorf("warnings = %v, want one about AuthorizationPolicy b/a in %q", set.Warnings, wantFile)
			}
		})
	}
}

func TestCreationTimestamp(t *testing.T) {
	tests := []struct {
		name string
		in   time.Time
		nano int64
		back time.Time
	}{
		{"none", time.Time{}, 0, time.Time{}},
		{"UTC", time.Date(2024, 5, 1, 12, 0, 0, 1, time.UTC), 1714564800000000001, time.Date(2024, 5, 1, 12, 0, 0, 1, time.UTC)},
		{"zone", time.Date(2024, 5, 1, 14, 0, 0, 0, time.FixedZone("CEST", 2*3600)), 1714564800000000000, time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)},
		{"before 1970", time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC), -2208988800000000000, time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC)},
		// Out of the message's range: clamped, not wrapped around.
		{"year 1000", time.Date(1000, 1, 1, 0, 0, 0, 0, time.UTC), -1 << 63, time.Unix(0, -1<<63).UTC()},
		{"year 3000", time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC), 1<<63 - 1, time.Unix(0, 1<<63-1).UTC()},
		{"zero instant but not zero time", time.Date(1, 1, 1, 0, 0, 0, 0, time.FixedZone("X", 3600)), -1 << 63, time.Unix(0, -1<<63).UTC()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pa := &policy.PeerAuthentication{Metadata: policy.Metadata{Name: "a", Namespace: "b", CreationTimestamp: tt.in}}
			pas, _ := policypb.FromSet(&policy.Set{PeerAuthentications: []*policy.PeerAuthentication{pa}})
			if got := pas[0].GetMetadata().GetCreationTimestampUnixNano(); got != tt.nano {
				t.Errorf("creation_timestamp_unix_nano = %d, want %d", got, tt.nano)
			}
			set, err := policypb.ToSet(pas, nil)
			if err != nil {
				t.Fatal(err)
			}
			got := set.PeerAuthentications[0].Metadata.CreationTimestamp
			if got != tt.back { // == also checks the location is UTC
				t.Errorf("creation time = %v, want %v", got, tt.back)
			}
		})
	}
}

func TestToSetSortsAndKeepsKindsApart(t *testing.T) {
	ap := func(ns, name string) *discoveryv1.AuthorizationPolicy {
		return &discoveryv1.AuthorizationPolicy{Metadata: &discoveryv1.Metadata{Namespace: ns, Name: name}}
	}
	pa := func(ns, name string) *discoveryv1.PeerAuthentication {
		return &discoveryv1.PeerAuthentication{Metadata: &discoveryv1.Metadata{Namespace: ns, Name: name}}
	}
	// One name in two kinds, or in two namespaces, is no duplicate.
	set, err := policypb.ToSet(
		[]*discoveryv1.PeerAuthentication{pa("b", "x"), pa("a", "x")},
		[]*discoveryv1.AuthorizationPolicy{ap("b", "x"), ap("a", "y"), ap("a", "x"), ap("a-b", "a")},
	)
	if err != nil {
		t.Fatal(err)
	}
	var pas, aps []string
	for _, pa := range set.PeerAuthentications {
		pas = append(pas, pa.Metadata.Ref())
	}
	for _, ap := range set.AuthorizationPolicies {
		aps = append(aps, ap.Metadata.Ref())
	}
	if diff := cmp.Diff([]string{"a/x", "b/x"}, pas); diff != "" {
		t.Errorf("PeerAuthentications (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"a/x", "a/y", "a-b/a", "b/x"}, aps); diff != "" {
		t.Errorf("AuthorizationPolicies (-want +got):\n%s", diff)
	}
}

func TestToSetDoesNotShareStorage(t *testing.T) {
	labels := map[string]string{"app": "a"}
	paths := []string{"/a"}
	set, err := policypb.ToSet(nil, []*discoveryv1.AuthorizationPolicy{{
		Metadata: &discoveryv1.Metadata{Namespace: "a", Name: "a"},
		Selector: &discoveryv1.Selector{MatchLabels: labels},
		Rules:    []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: paths}}}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	labels["app"], paths[0] = "b", "/b"
	ap := set.AuthorizationPolicies[0]
	if ap.Spec.Selector.MatchLabels["app"] != "a" || ap.Spec.Rules[0].To[0].Operation.Paths[0] != "/a" {
		t.Errorf("the set changed with the messages: %+v", ap.Spec)
	}
	pas, aps := policypb.FromSet(set)
	aps[0].Selector.MatchLabels["app"] = "c"
	aps[0].Rules[0].To[0].Paths[0] = "/c"
	if len(pas) != 0 || ap.Spec.Selector.MatchLabels["app"] != "a" || ap.Spec.Rules[0].To[0].Operation.Paths[0] != "/a" {
		t.Errorf("the set changed with the messages: %+v", ap.Spec)
	}
}

// validPA and validAP are valid resources for the rejection cases to break.
func validPA() *discoveryv1.PeerAuthentication {
	return &discoveryv1.PeerAuthentication{
		Metadata: &discoveryv1.Metadata{Name: "orders-api", Namespace: "shipping", Source: "pa.yaml: document 1 (line 1)"},
		Selector: &discoveryv1.Selector{MatchLabels: map[string]string{"app": "orders-api"}},
		MtlsMode: "STRICT",
	}
}

func validAP() *discoveryv1.AuthorizationPolicy {
	return &discoveryv1.AuthorizationPolicy{
		Metadata: &discoveryv1.Metadata{Name: "allow-checkout", Namespace: "shipping", Source: "ap.yaml: document 2 (line 9)"},
		Action:   "ALLOW",
		Rules: []*discoveryv1.Rule{{
			From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/default/sa/checkout"}}},
			To:   []*discoveryv1.Operation{{Paths: []string{"/v1/orders"}, Ports: []string{"8080"}}},
			When: []*discoveryv1.Condition{{Key: "source.ip", Values: []string{"10.0.0.0/8"}}},
		}},
	}
}

func TestToSetRejects(t *testing.T) {
	pa := func(edit func(*discoveryv1.PeerAuthentication)) []*discoveryv1.PeerAuthentication {
		m := validPA()
		edit(m)
		return []*discoveryv1.PeerAuthentication{m}
	}
	ap := func(edit func(*discoveryv1.AuthorizationPolicy)) []*discoveryv1.AuthorizationPolicy {
		m := validAP()
		edit(m)
		return []*discoveryv1.AuthorizationPolicy{m}
	}
	const (
		paRef = "pa.yaml: document 1 (line 1), PeerAuthentication shipping/orders-api: "
		apRef = "ap.yaml: document 2 (line 9), AuthorizationPolicy shipping/allow-checkout: "
	)
	tests := []struct {
		name string
		pas  []*discoveryv1.PeerAuthentication
		aps  []*discoveryv1.AuthorizationPolicy
		want []string // in the error message
	}{
		{name: "null PeerAuthentication", pas: []*discoveryv1.PeerAuthentication{validPA(), nil},
			want: []string{"peer_authentications[1]: is null"}},
		{name: "null AuthorizationPolicy", aps: []*discoveryv1.AuthorizationPolicy{nil},
			want: []string{"authorization_policies[0]: is null"}},
		{name: "PeerAuthentication without metadata", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.Metadata = nil }),
			want: []string{"peer_authentications[0], PeerAuthentication: metadata: is required"}},
		{name: "AuthorizationPolicy without metadata", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Metadata = nil }),
			want: []string{"authorization_policies[0], AuthorizationPolicy: metadata: is required"}},
		{name: "empty name", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.Metadata.Name = "" }),
			want: []string{"PeerAuthentication shipping/: metadata.name: is required"}},
		{name: "empty namespace", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Metadata.Namespace = "" }),
			want: []string{"AuthorizationPolicy /allow-checkout: metadata.namespace: \"\" is not a valid namespace"}},
		{name: "invalid label", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.Metadata.Labels = map[string]string{"app": "a b"} }),
			want: []string{paRef + "metadata.labels[app]: label value"}},
		{name: "lower-case mode", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.MtlsMode = "strict" }),
			want: []string{paRef + `spec.mtls.mode: unknown mode "strict"`, "did you mean STRICT"}},
		{name: "unknown port-level mode", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.PortLevelMtls = map[uint32]string{8080: "OPTIONAL"} }),
			want: []string{paRef + `spec.portLevelMtls[8080].mode: unknown mode "OPTIONAL"`}},
		{name: "empty port-level mode", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.PortLevelMtls = map[uint32]string{8080: ""} }),
			want: []string{paRef + "spec.portLevelMtls[8080].mode: is required"}},
		{name: "port 0", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.PortLevelMtls = map[uint32]string{0: "STRICT"} }),
			want: []string{paRef + "spec.portLevelMtls[0]: port must be from 1 to 65535"}},
		{name: "port out of range", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.PortLevelMtls = map[uint32]string{70000: "STRICT"} }),
			want: []string{paRef + "spec.portLevelMtls[70000]: port must be from 1 to 65535"}},
		{name: "port-level mTLS without selector", pas: pa(func(m *discoveryv1.PeerAuthentication) {
			m.Selector, m.PortLevelMtls = &discoveryv1.Selector{}, map[uint32]string{8080: "STRICT"}
		}),
			want: []string{paRef + "spec.portLevelMtls: only a workload PeerAuthentication"}},
		{name: "dry-run PeerAuthentication", pas: pa(func(m *discoveryv1.PeerAuthentication) {
			m.Metadata.Annotations = map[string]string{policy.DryRunAnnotation: "true"}
		}),
			want: []string{paRef + "metadata.annotations[trellis.dev/dry-run]: dry-run applies to AuthorizationPolicy only"}},
		{name: "unknown action", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Action = "REJECT" }),
			want: []string{apRef + `spec.action: unknown action "REJECT"`}},
		{name: "CUSTOM action", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Action = "CUSTOM" }),
			want: []string{apRef + "spec.action: CUSTOM (an external authorizer) is not supported"}},
		{name: "invalid dry-run value", aps: ap(func(m *discoveryv1.AuthorizationPolicy) {
			m.Metadata.Annotations = map[string]string{policy.IstioDryRunAnnotation: "yes"}
		}),
			want: []string{apRef + `metadata.annotations[istio.io/dry-run]: must be "true" or "false"`}},
		{name: "null rule", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules = append(m.Rules, nil) }),
			want: []string{apRef + "spec.rules[1]: is null"}},
		{name: "null source", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].From[0] = nil }),
			want: []string{apRef + "spec.rules[0].from[0].source: is required"}},
		{name: "empty source", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].From[0] = &discoveryv1.Source{} }),
			want: []string{apRef + "spec.rules[0].from[0].source: must set at least one"}},
		{name: "null operation", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].To[0] = nil }),
			want: []string{apRef + "spec.rules[0].to[0].operation: is required"}},
		{name: "null condition", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].When[0] = nil }),
			want: []string{apRef + "spec.rules[0].when[0].key: is required"}},
		{name: "principal with scheme", aps: ap(func(m *discoveryv1.AuthorizationPolicy) {
			m.Rules[0].From[0].Principals = []string{"spiffe://cluster.local/ns/default/sa/checkout"}
		}),
			want: []string{apRef + "spec.rules[0].from[0].source.principals[0]: principals are written without the spiffe:// scheme"}},
		{name: "inner wildcard", aps: ap(func(m *discoveryv1.AuthorizationPolicy) {
			m.Rules[0].From[0] = &discoveryv1.Source{NotPrincipals: []string{"cluster.local/*/sa/x"}}
		}),
			want: []string{apRef + "spec.rules[0].from[0].source.notPrincipals[0]: invalid value"}},
		{name: "empty principal", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].From[0].Principals = []string{""} }),
			want: []string{apRef + "spec.rules[0].from[0].source.principals[0]: invalid value"}},
		{name: "bad path template", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].To[0].Paths = []string{"/v1/orders/{id}"} }),
			want: []string{apRef + `spec.rules[0].to[0].operation.paths[0]: invalid path pattern "/v1/orders/{id}"`}},
		{name: "relative path", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].To[0].NotPaths = []string{"v1/orders"} }),
			want: []string{apRef + "spec.rules[0].to[0].operation.notPaths[0]: invalid path pattern"}},
		{name: "bad port", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].To[0].Ports = []string{"08080"} }),
			want: []string{apRef + `spec.rules[0].to[0].operation.ports[0]: invalid port "08080"`}},
		{name: "bad IP block", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].When[0].Values = []string{"10.0.0.0/33"} }),
			want: []string{apRef + `spec.rules[0].when[0].values[0]: invalid IP block "10.0.0.0/33"`}},
		{name: "unsupported key", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].When[0].Key = "request.auth.claims[iss]" }),
			want: []string{apRef + `spec.rules[0].when[0].key: "request.auth.claims[iss]" is not supported`}},
		{name: "condition without values", aps: ap(func(m *discoveryv1.AuthorizationPolicy) { m.Rules[0].When[0].Values = nil }),
			want: []string{apRef + "spec.rules[0].when[0]: must set values or notValues"}},
		{name: "duplicate PeerAuthentication", pas: []*discoveryv1.PeerAuthentication{validPA(), validPA()},
			want: []string{paRef + "metadata.name: PeerAuthentication shipping/orders-api is also sent from pa.yaml: document 1 (line 1)"}},
		{name: "duplicate AuthorizationPolicy without source", aps: func() []*discoveryv1.AuthorizationPolicy {
			first, second := validAP(), validAP()
			first.Metadata.Source, second.Metadata.Source, second.Action = "", "", "DENY"
			return []*discoveryv1.AuthorizationPolicy{first, second}
		}(),
			want: []string{"authorization_policies[1], AuthorizationPolicy shipping/allow-checkout: metadata.name: AuthorizationPolicy shipping/allow-checkout is also sent from authorization_policies[0]"}},
		{name: "every problem is listed", pas: pa(func(m *discoveryv1.PeerAuthentication) { m.MtlsMode = "ON" }),
			aps:  ap(func(m *discoveryv1.AuthorizationPolicy) { m.Action = "deny" }),
			want: []string{"2 problems", "spec.mtls.mode", "spec.action", "did you mean DENY"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := policypb.ToSet(tt.pas, tt.aps)
			if err == nil {
				t.Fatalf("accepted: %+v", set)
			}
			if set != nil {
				t.Error("returned a set with the error")
			}
			if !errors.Is(err, policy.ErrInvalid) {
				t.Errorf("%v does not match policy.ErrInvalid", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not mention %q", err, w)
				}
			}
		})
	}
}
