package policy

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestLoadDirExamples(t *testing.T) {
	set, err := LoadDir(filepath.Join("..", "..", "examples", "policies"))
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
	// Sorted by namespace/name whatever the file order.
	if diff := cmp.Diff([]string{"production/default-strict-mtls", "shipping/default", "shipping/orders-api-metrics", "trellis-system/default"}, pas); diff != "" {
		t.Errorf("PeerAuthentications (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"shipping/allow-checkout-to-orders", "shipping/deny-order-deletes", "trellis-system/deny-foreign-namespaces"}, aps); diff != "" {
		t.Errorf("AuthorizationPolicies (-want +got):\n%s", diff)
	}
	if len(set.Warnings) != 0 {
		t.Errorf("warnings: %v", set.Warnings)
	}
}

func TestLoadDirMixed(t *testing.T) {
	set, err := LoadDir(filepath.Join("testdata", "mixed"))
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Files) != 2 {
		t.Errorf("files = %v, want the .yml and .yaml files only", set.Files)
	}
	if diff := cmp.Diff([]Skipped{{
		Location:   Location{File: filepath.Join("testdata", "mixed", "policies.yaml"), Document: 1, Line: 5},
		APIVersion: "apps/v1",
		Kind:       "Deployment",
	}}, set.Skipped); diff != "" {
		t.Errorf("skipped (-want +got):\n%s", diff)
	}
	if len(set.AuthorizationPolicies) != 2 {
		t.Fatalf("got %d AuthorizationPolicies, want 2", len(set.AuthorizationPolicies))
	}
	// An omitted namespace is "default", an omitted spec an ALLOW with no
	// rules (Istio's allow-nothing).
	nothing := set.AuthorizationPolicies[0]
	if nothing.Metadata.Ref() != "default/allow-nothing" || nothing.Spec.EffectiveAction() != ActionAllow || len(nothing.Spec.Rules) != 0 {
		t.Errorf("allow-nothing = %+v", nothing)
	}
	// A v1 List as kubectl get -o yaml prints it, with server-set metadata.
	fromList := set.AuthorizationPolicies[1]
	want := &AuthorizationPolicy{
		APIVersion: "security.istio.io/v1",
		Metadata: Metadata{
			Name:              "from-list",
			Namespace:         "shipping",
			CreationTimestamp: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC),
		},
		Spec:     AuthorizationPolicySpec{Action: ActionAudit, Rules: []Rule{{}}},
		Location: Location{File: filepath.Join("testdata", "mixed", "policies.yaml"), Document: 2, Line: 12},
	}
	if diff := cmp.Diff(want, fromList); diff != "" {
		t.Errorf("from-list (-want +got):\n%s", diff)
	}
}

// A directory with one bad file is rejected whole, with every problem of
// every file listed.
func TestLoadDirRejectsWhole(t *testing.T) {
	set, err := LoadDir(filepath.Join("testdata", "bad"))
	if set != nil {
		t.Errorf("got a set from an invalid directory")
	}
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("err = %v, want ErrInvalid", err)
	}
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("err is %T, want Errors", err)
	}
	var got []string
	for _, e := range errs {
		got = append(got, e.Error())
	}
	bad := filepath.Join("testdata", "bad")
	want := []string{
		filepath.Join(bad, "b-typo.yaml") + `: document 1 (line 1), PeerAuthentication shipping/typo: spec.mtls.mode: unknown mode "STICT"; allowed: STRICT, PERMISSIVE, DISABLE, UNSET`,
		filepath.Join(bad, "b-typo.yaml") + `: document 2 (line 10), AuthorizationPolicy shipping/custom: spec.action: CUSTOM (an external authorizer) is not supported yet; allowed: ALLOW, DENY, AUDIT`,
		filepath.Join(bad, "c-syntax.yaml") + `: document 1 (line 1): invalid YAML: line 3: did not find expected ',' or '}'; fix the syntax`,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("errors (-want +got):\n%s", diff)
	}
	if !strings.HasPrefix(err.Error(), "3 problems in policy files:\n  ") {
		t.Errorf("Error() = %q", err.Error())
	}
}

func TestLoadFilesMissing(t *testing.T) {
	_, err := LoadFiles(filepath.Join("testdata", "nope.yaml"))
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "file does not exist") {
		t.Errorf("err = %v", err)
	}
}

func TestSplitDocuments(t *testing.T) {
	in := "# header\n---\na: 1\n---   \n\n# only a comment\n--- {b: 2}\n...\nc: 3\n--- |\n  text\n"
	got := splitDocuments([]byte(in))
	want := []document{
		{index: 1, line: 3, first: 2, data: []byte("   \na: 1\n")},
		{index: 2, line: 7, first: 7, data: []byte("    {b: 2}\n")},
		{index: 3, line: 9, first: 9, data: []byte("c: 3\n")},
		{index: 4, line: 10, first: 10, data: []byte("    |\n  text\n")},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(document{})); diff != "" {
		t.Errorf("documents (-want +got):\n%s", diff)
	}
}

func TestDuplicateNames(t *testing.T) {
	doc := "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\n"
	_, err := Parse("dup.yaml", []byte(doc+"---\n"+doc))
	want := `dup.yaml: document 2 (line 5), AuthorizationPolicy x/a: metadata.name: AuthorizationPolicy x/a is already defined in dup.yaml document 1; names must be unique per kind and namespace, so rename or remove one`
	if err == nil || err.Error() != want {
		t.Errorf("err = %v\nwant %s", err, want)
	}
	// The same name in two kinds is fine.
	pa := "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: x}\n"
	if _, err := Parse("two-kinds.yaml", []byte(doc+"---\n"+pa)); err != nil {
		t.Errorf("err = %v", err)
	}
}

func TestDryRun(t *testing.T) {
	for _, tt := range []struct {
		annotations map[string]string
		want        bool
	}{
		{nil, false},
		{map[string]string{DryRunAnnotation: "true"}, true},
		{map[string]string{DryRunAnnotation: "false"}, false},
		{map[string]string{IstioDryRunAnnotation: "true"}, true},
	} {
		ap := &AuthorizationPolicy{Metadata: Metadata{Annotations: tt.annotations}}
		if got := ap.DryRun(); got != tt.want {
			t.Errorf("DryRun() with %v = %v, want %v", tt.annotations, got, tt.want)
		}
	}
}

func TestWarnings(t *testing.T) {
	in := `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: lower, namespace: x}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: ["delete"]}
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: trellis-system}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: STRICT}
`
	set, err := Parse("w.yaml", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range set.Warnings {
		got = append(got, w.Field+": "+w.Message)
	}
	want := []string{
		`spec.rules[0].to[0].operation.methods[0]: HTTP methods are case-sensitive and "delete" is not upper case, so it will never match a standard method; write "DELETE"`,
		`spec.selector: a PeerAuthentication with a selector in the root namespace trellis-system applies only to workloads in trellis-system, not mesh-wide; remove the selector for a mesh-wide policy`,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("warnings (-want +got):\n%s", diff)
	}
}
