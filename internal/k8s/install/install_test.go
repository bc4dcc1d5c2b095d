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
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "Service", "Deployment", "MutatingWebhookConfiguration"} {
		if len(byKind[k]) != 1 {
			t.Errorf("%d %s documents, want 1", len(byKind[k]), k)
		}
	}
	if s := string(out); !strings.Contains(s, "replicas: 1") || !strings.Contains(s, "type: Recreate") {
		t.Error("want one control plane at a time: two would both write the CA")
	}
}

func TestRenderErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"no images", Options{}, "images are required"},
		{"bad trust domain", Options{Image: "a", ProxyImage: "b", TrustDomain: "Not A Domain"}, "--trust-domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Render(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
