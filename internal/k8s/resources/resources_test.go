package resources

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// sourceOf gives the loader the resource as its author wrote it: no
// status, no managed fields, no kubectl copy of a previous spec — which
// the strict loader would otherwise refuse or read twice.
func TestSourceOfStripsBookkeeping(t *testing.T) {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.trellis.dev/v1",
		"kind":       "PeerAuthentication",
		"metadata": map[string]any{
			"name": "default", "namespace": "shipping", "generation": int64(3), "uid": "u", "resourceVersion": "9",
			"managedFields": []any{map[string]any{"manager": "kubectl"}},
			"annotations":   map[string]any{"kubectl.kubernetes.io/last-applied-configuration": `{"spec":{"mtls":{"mode":"DISABLE"}}}`},
		},
		"spec":   map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
		"status": map[string]any{"conditions": []any{}},
	}}
	src, err := sourceOf(object{kind: Kinds[0], u: u, key: SourceName("PeerAuthentication", "shipping", "default")})
	if err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{"status", "managedFields", "last-applied", "DISABLE"} {
		if strings.Contains(string(src.Data), gone) {
			t.Errorf("source keeps %q:\n%s", gone, src.Data)
		}
	}
	set, err := policy.ParseSources([]policy.SourceFile{src})
	if err != nil {
		t.Fatalf("the loader refuses it: %v", err)
	}
	if got := set.PeerAuthentications[0].Spec.MTLS.Mode; got != policy.ModeStrict {
		t.Errorf("mode %q, want STRICT", got)
	}
	if u.Object["status"] == nil {
		t.Error("sourceOf changed the cached object")
	}
}

func TestDescribeNamesTheFields(t *testing.T) {
	_, err := policy.ParseSources([]policy.SourceFile{{Name: SourceName("AuthorizationPolicy", "shipping", "x"), Data: []byte(
		"apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: shipping}\nspec: {action: ALOW, rules: [{to: [{operation: {method: [GET]}}]}]}\n")}})
	if err == nil {
		t.Fatal("the policy was accepted")
	}
	got := describe(err)
	for _, want := range []string{"spec.action", "spec.rules[0].to[0].operation.method", "allowed fields: hosts, methods"} {
		if !strings.Contains(got, want) {
			t.Errorf("%q lacks %q", got, want)
		}
	}
	if strings.Contains(got, "kubernetes:") {
		t.Errorf("%q repeats the source name, which the status already belongs to", got)
	}
}
