package clustercheck

import (
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

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/resources"
	"github.com/trellis-mesh/trellis/internal/meshcheck"
)

var now = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

func root(t *testing.T, notAfter time.Time) string {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, NotBefore: now.Add(-time.Hour), NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// pod is a pod of ns, injected or not, whose proxy is ready or not, age old.
func pod(ns, name string, injected, ready bool, age time.Duration) corev1.Pod {
	p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.NewTime(now.Add(-age))},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	if injected {
		p.Spec.InitContainers = []corev1.Container{{Name: inject.ProxyContainer}}
		p.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: inject.ProxyContainer, Ready: ready}}
	}
	return p
}

func healthy(t *testing.T) Facts {
	f := Facts{CRDs: map[string]bool{}, ControlPlane: &DeploymentFacts{Desired: 1, Available: 1},
		Webhook: &admissionv1.MutatingWebhookConfiguration{Webhooks: []admissionv1.MutatingWebhook{{
			ClientConfig: admissionv1.WebhookClientConfig{CABundle: []byte("x"), Service: &admissionv1.ServiceReference{Name: "cp"}}}}},
		WebhookEndpoints: 1,
		Pods:             []corev1.Pod{pod("shipping", "orders-a", true, true, time.Hour)},
		MeshedNamespaces: []string{"shipping"},
		Bundle:           root(t, now.Add(365*24*time.Hour)),
	}
	for _, k := range resources.Kinds {
		f.CRDs[k.GVR.Resource+"."+k.GVR.Group] = true
	}
	return f
}

func TestEvaluate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edit  func(*Facts)
		check string
		level meshcheck.Level
		want  string
	}{
		{"healthy", func(*Facts) {}, "proxies", meshcheck.OK, "1 of 1 injected pods have a ready proxy"},
		{"a CRD missing", func(f *Facts) { delete(f.CRDs, "peerauthentications.security.trellis.dev") }, "CRDs", meshcheck.Fail, "peerauthentications.security.trellis.dev"},
		{"a CRD not established", func(f *Facts) { f.CRDs["serviceentries.networking.trellis.dev"] = false }, "CRDs", meshcheck.Warn, "not established"},
		{"no control plane in the cluster", func(f *Facts) { f.ControlPlane = nil }, "control plane", meshcheck.Warn, "outside"},
		{"control plane down", func(f *Facts) { f.ControlPlane.Available = 0 }, "control plane", meshcheck.Fail, "no available replica"},
		{"no webhook", func(f *Facts) { f.Webhook = nil }, "injector", meshcheck.Fail, "trellis install"},
		{"webhook without CA", func(f *Facts) { f.Webhook.Webhooks[0].ClientConfig.CABundle = nil }, "injector", meshcheck.Fail, "no CA bundle"},
		{"webhook without endpoints", func(f *Facts) { f.WebhookEndpoints = 0 }, "injector", meshcheck.Fail, "no ready endpoint"},
		{"webhook by URL", func(f *Facts) {
			f.WebhookEndpoints = 0
			f.Webhook.Webhooks[0].ClientConfig.Service, f.Webhook.Webhooks[0].ClientConfig.URL = nil, ptr.To("https://127.0.0.1:1/inject")
		}, "injector", meshcheck.OK, "configured"},
		{"a proxy not ready for long", func(f *Facts) { f.Pods = append(f.Pods, pod("shipping", "orders-b", true, false, time.Hour)) }, "proxies", meshcheck.Fail, "shipping/orders-b"},
		{"a proxy starting", func(f *Facts) { f.Pods = append(f.Pods, pod("shipping", "orders-b", true, false, 10*time.Second)) }, "proxies", meshcheck.OK, "1 of 2"},
		{"a pod left outside", func(f *Facts) { f.Pods = append(f.Pods, pod("shipping", "old", false, false, time.Hour)) }, "injection", meshcheck.Warn, "shipping/old"},
		{"root expiring", func(f *Facts) { f.Bundle = root(t, now.Add(10*24*time.Hour)) }, "trust bundle", meshcheck.Warn, "in 10 days"},
		{"root expired", func(f *Facts) { f.Bundle = root(t, now.Add(-time.Hour)) }, "trust bundle", meshcheck.Fail, "expired"},
		{"no bundle", func(f *Facts) { f.Bundle = "" }, "trust bundle", meshcheck.Warn, "publishes it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := healthy(t)
			tc.edit(&f)
			var found *meshcheck.Finding
			fs := Evaluate(f, now)
			for i := range fs {
				if fs[i].Check == tc.check {
					found = &fs[i]
				}
			}
			if found == nil || found.Level != tc.level || !strings.Contains(found.Message, tc.want) {
				t.Fatalf("%s: %+v, want %s containing %q (all: %+v)", tc.check, found, tc.level, tc.want, fs)
			}
		})
	}
	// A disabled pod of a meshed namespace is not a warning.
	f := healthy(t)
	p := pod("shipping", "legacy", false, false, time.Hour)
	p.Annotations = map[string]string{inject.Annotation: "disabled"}
	f.Pods = append(f.Pods, p)
	for _, x := range Evaluate(f, now) {
		if x.Check == "injection" {
			t.Errorf("a pod that opted out is reported: %+v", x)
		}
	}
}
