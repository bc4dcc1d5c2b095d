package install

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

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
	if s := string(out); !strings.Contains(s, "replicas: 1") || len(byKind["PodDisruptionBudget"]) != 0 {
		t.Error("want one control plane by default, and no disruption budget that would block a drain")
	}
}

func TestRenderReplicas(t *testing.T) {
	o := images
	o.Replicas = 3
	out, err := Render(o)
	if err != nil {
		t.Fatal(err)
	}
	_, byKind := kinds(t, out)
	if len(byKind["PodDisruptionBudget"]) != 1 {
		t.Error("several control planes without a disruption budget")
	}
	for _, want := range []string{"replicas: 3", "podAntiAffinity", "maxSurge: 1", "--leader-elect", "leases"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("manifests lack %q", want)
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
		{"negative replicas", Options{Image: "a", ProxyImage: "b", Replicas: -1}, "--replicas -1"},
		{"bad trust domain", Options{Image: "a", ProxyImage: "b", TrustDomain: "Not A Domain"}, "--trust-domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Render(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestRenderUserRoot(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	mk := func(isCA bool) []byte {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
			IsCA: isCA, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	der, _ := x509.MarshalECPrivateKey(key)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})

	o := images
	o.RootCertPEM, o.RootKeyPEM = mk(true), keyPEM
	out, err := Render(o)
	if err != nil {
		t.Fatal(err)
	}
	_, byKind := kinds(t, out)
	if len(byKind["Secret"]) != 1 || !strings.Contains(string(out), "--root-secret\n        - "+Namespace+"/"+RootSecret) {
		t.Errorf("want the root in Secret %s and the control plane told of it:\n%s", RootSecret, out)
	}
	if !strings.Contains(string(out), "- "+RootSecret) {
		t.Error("the control plane may not read the root's Secret")
	}

	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"cert without key", Options{Image: "a", ProxyImage: "b", RootCertPEM: mk(true)}, "go together"},
		{"not a CA", Options{Image: "a", ProxyImage: "b", RootCertPEM: mk(false), RootKeyPEM: keyPEM}, "not a CA certificate"},
		{"files and a secret", Options{Image: "a", ProxyImage: "b", RootCertPEM: mk(true), RootKeyPEM: keyPEM, RootSecret: "x"}, "give one"},
	} {
		if _, err := Render(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}
