package install

import (
	"bytes"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

var images = Options{Image: "r.example/trellis:1", ProxyImage: "r.example/trellis-proxy:1"}

// kinds returns the kind of each document, and the documents by kind.
func kinds(t *testing.T, data []byte) ([]string, map[string][]map[string]any) {
	t.Helper()
	var order []string
	byKind := map[string][]map[string]any{}
	for doc := range bytes.SplitSeq(data, []byte("---\n")) {
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var m map[string]any
		if err := yaml.UnmarshalStrict(doc, &m); err != nil {
			t.Fatalf("a document does not parse: %v\n%s", err, doc)
		}
		k, _ := m["kind"].(string)
		order = append(order, k)
		byKind[k] = append(byKind[k], m)
	}
	return order, byKind
}

func TestRender(t *testing.T) {
	out, err := Render(images)
	if err != nil {
		t.Fatal(err)
	}
	order, byKind := kinds(t, out)
	if len(byKind["CustomResourceDefinition"]) != 5 {
		t.Errorf("%d CRDs, want 5", len(byKind["CustomResourceDefinition"]))
	}
	if order[0] != "CustomResourceDefinition" {
		t.Errorf("first document is a %s; CRDs come first so that resources using them can follow", order[0])
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment", "MutatingWebhookConfiguration"} {
		if len(byKind[k]) != 1 {
			t.Errorf("%d %s documents, want 1", len(byKind[k]), k)
		}
	}
	if len(byKind["PodDisruptionBudget"]) != 0 {
		t.Error("a PodDisruptionBudget for a single control plane would block node drains")
	}
	if s := string(out); strings.Contains(s, "--leader-elect") || !strings.Contains(s, "replicas: 1") {
		t.Error("without --ha: want one replica and no leader election")
	}
}

func TestRenderHA(t *testing.T) {
	o := images
	o.HA = true
	out, err := Render(o)
	if err != nil {
		t.Fatal(err)
	}
	_, byKind := kinds(t, out)
	if len(byKind["PodDisruptionBudget"]) != 1 {
		t.Error("HA without a PodDisruptionBudget")
	}
	s := string(out)
	for _, want := range []string{"replicas: 3", "--leader-elect", "podAntiAffinity"} {
		if !strings.Contains(s, want) {
			t.Errorf("HA manifests lack %q", want)
		}
	}
}

func TestRenderErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"no images", Options{}, "images are required"},
		{"replicas without HA", Options{Image: "a", ProxyImage: "b", Replicas: 2}, "--replicas 2 needs --ha"},
		{"bad trust domain", Options{Image: "a", ProxyImage: "b", TrustDomain: "Not A Domain"}, "--trust-domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Render(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
