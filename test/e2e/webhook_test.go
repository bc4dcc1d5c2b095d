package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/k8s/webhook"
)

// TestWebhook registers the sidecar injector with a real API server (the
// webhook configuration install writes, pointed at a URL: without
// kube-proxy the API server cannot reach a Service) and creates pods
// through it: a Deployment's pods, made by the real controller manager, in
// a meshed namespace; a pod that opts out there; a pod that opts in
// elsewhere; and a pod the injector must refuse.
func TestWebhook(t *testing.T) {
	env, ctx, kubectl := startCluster(t, 3*time.Minute)
	restConfig, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	getPod := func(namespace, name string) *corev1.Pod {
		t.Helper()
		pod, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return pod
	}

	const proxyImage = "registry.example/trellis-proxy:test"
	caPEM, cert := servingCert(t)
	mux := http.NewServeMux()
	mux.Handle(install.WebhookPath, &webhook.Injector{
		Config: inject.Config{ProxyImage: proxyImage},
		// The control plane reads namespaces from an informer; a GET sees
		// a namespace as soon as it exists, which the test's pods need.
		Namespaces: func(ctx context.Context, name string) (map[string]string, error) {
			ns, err := client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			return ns.Labels, nil
		},
		Log: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	t.Cleanup(srv.Close)

	kubectl(webhookConfig(t, srv.URL+install.WebhookPath, caPEM), "apply", "--validate=strict", "-f", "-")
	t.Cleanup(func() {
		if _, err := env.Kubectl(context.Background(), "", "delete", "mutatingwebhookconfiguration", install.WebhookName, "--wait=false"); err != nil {
			t.Error(err)
		}
	})
	kubectl(`apiVersion: v1
kind: Namespace
metadata: {name: shipping, labels: {trellis.dev/inject: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
`, "apply", "-f", "-")
	t.Cleanup(func() {
		if _, err := env.Kubectl(context.Background(), "", "delete", "namespace", "shipping", "legacy", "--wait=false"); err != nil {
			t.Error(err)
		}
	})
	defer func() {
		if t.Failed() {
			out, _ := env.Kubectl(ctx, "", "get", "deploy,rs,pods,events", "-n", "shipping")
			t.Logf("in namespace shipping:\n%s", out)
		}
	}()

	pod := func(namespace, name string, annotations map[string]string, container string) string {
		var ann string
		for k, v := range annotations {
			ann += fmt.Sprintf(", annotations: {%s: %s}", k, v)
		}
		return fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: %s%s}\nspec:\n  containers: [{name: %s, image: busybox, ports: [{name: http, containerPort: 8080}]}]\n",
			name, namespace, ann, container)
	}
	// The API server loads webhook configurations from its own watch, and
	// pods need their namespace's default service account: a dry run
	// creates nothing and passes through both.
	waitFor(t, 30*time.Second, "the webhook to inject a dry-run pod in shipping", func() bool {
		out, err := env.Kubectl(ctx, pod("shipping", "probe", nil, "app"), "create", "--dry-run=server", "-o", "json", "-f", "-")
		var p corev1.Pod
		return err == nil && json.Unmarshal([]byte(out), &p) == nil && inject.Injected(&p.Spec)
	})
	waitFor(t, 30*time.Second, "the default service account in legacy", func() bool {
		_, err := client.CoreV1().ServiceAccounts("legacy").Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})

	t.Run("deployment", func(t *testing.T) {
		kubectl(`apiVersion: apps/v1
kind: Deployment
metadata: {name: orders-api, namespace: shipping}
spec:
  replicas: 2
  selector: {matchLabels: {app: orders-api}}
  template:
    metadata: {labels: {app: orders-api}}
    spec:
      containers: [{name: api, image: registry.example/orders-api:1, ports: [{name: http, containerPort: 8080}]}]
`, "apply", "--validate=strict", "-f", "-")
		var pods *corev1.PodList
		waitFor(t, 60*time.Second, "the Deployment's two pods", func() bool {
			var err error
			pods, err = client.CoreV1().Pods("shipping").List(ctx, metav1.ListOptions{LabelSelector: "app=orders-api"})
			return err == nil && len(pods.Items) == 2
		})
		for _, p := range pods.Items {
			ic := p.Spec.InitContainers
			if len(ic) != 2 || ic[0].Name != inject.InitContainer || ic[1].Name != inject.ProxyContainer ||
				ic[1].RestartPolicy == nil || *ic[1].RestartPolicy != corev1.ContainerRestartPolicyAlways || ic[1].Image != proxyImage {
				t.Errorf("pod %s: init containers %v, want %s then %s (%s, restartPolicy Always)", p.Name, names(ic), inject.InitContainer, inject.ProxyContainer, proxyImage)
			}
			cfg := p.Annotations[inject.ProxyConfigAnnotation]
			if !strings.Contains(cfg, "workload: {name: orders-api}") || !strings.Contains(cfg, "appPort: 8080") {
				t.Errorf("pod %s: proxy configuration %q: want workload orders-api and port 8080", p.Name, cfg)
			}
			if len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Name != "api" {
				t.Errorf("pod %s: containers %v, want api alone", p.Name, names(p.Spec.Containers))
			}
			// The service account token volume the API server added before
			// the webhook survives the patch.
			if !hasVolumePrefix(p.Spec.Volumes, "kube-api-access-") {
				t.Errorf("pod %s: volumes %v lost the service account token", p.Name, p.Spec.Volumes)
			}
			// ...but the sidecar's containers do not get it: they never
			// call the Kubernetes API.
			for _, c := range ic {
				for _, m := range c.VolumeMounts {
					if strings.HasPrefix(m.Name, "kube-api-access-") {
						t.Errorf("pod %s: container %s mounts the Kubernetes API token %s", p.Name, c.Name, m.Name)
					}
				}
			}
		}
	})

	t.Run("opted out", func(t *testing.T) {
		kubectl(pod("shipping", "debug", map[string]string{inject.Annotation: "disabled"}, "sh"), "create", "-f", "-")
		p := getPod("shipping", "debug")
		if inject.Injected(&p.Spec) || p.Annotations[inject.StatusAnnotation] != "" {
			t.Errorf("pod annotated %s: disabled was injected: init containers %v", inject.Annotation, names(p.Spec.InitContainers))
		}
	})

	t.Run("opted in elsewhere", func(t *testing.T) {
		kubectl(pod("legacy", "tool", map[string]string{inject.Annotation: "enabled"}, "sh"), "create", "-f", "-")
		p := getPod("legacy", "tool")
		if !inject.Injected(&p.Spec) || !strings.Contains(p.Annotations[inject.ProxyConfigAnnotation], "workload: {name: tool}") {
			t.Errorf("pod annotated %s: enabled in an unlabelled namespace: init containers %v, proxy configuration %q; want injected as workload tool",
				inject.Annotation, names(p.Spec.InitContainers), p.Annotations[inject.ProxyConfigAnnotation])
		}
		kubectl(pod("legacy", "plain", nil, "sh"), "create", "-f", "-")
		if p := getPod("legacy", "plain"); inject.Injected(&p.Spec) {
			t.Errorf("pod in an unlabelled namespace, without annotation, was injected")
		}
	})

	t.Run("refused", func(t *testing.T) {
		_, err := env.Kubectl(ctx, pod("shipping", "impostor", nil, inject.ProxyContainer), "create", "-f", "-")
		if err == nil {
			t.Fatal("a pod with a container named trellis-proxy was admitted")
		}
		for _, want := range []string{`admission webhook "namespace.inject.trellis.dev" denied the request`, "spec.containers", "rename it"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("refusal %q does not say %q", err, want)
			}
		}
		if _, err := client.CoreV1().Pods("shipping").Get(ctx, "impostor", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("the refused pod: %v, want not found", err)
		}
	})
}

func names(cs []corev1.Container) []string {
	var n []string
	for _, c := range cs {
		n = append(n, c.Name)
	}
	return n
}

func hasVolumePrefix(vs []corev1.Volume, prefix string) bool {
	for _, v := range vs {
		if strings.HasPrefix(v.Name, prefix) {
			return true
		}
	}
	return false
}

// webhookConfig is install's MutatingWebhookConfiguration calling url,
// trusting caPEM.
func webhookConfig(t *testing.T, url string, caPEM []byte) string {
	t.Helper()
	manifests, err := install.Render(install.Options{Image: "registry.example/trellis:test", ProxyImage: "registry.example/trellis-proxy:test"})
	if err != nil {
		t.Fatal(err)
	}
	for doc := range strings.SplitSeq(string(manifests), "\n---\n") {
		var cfg admissionregistrationv1.MutatingWebhookConfiguration
		if err := yaml.Unmarshal([]byte(doc), &cfg); err != nil || cfg.Kind != "MutatingWebhookConfiguration" {
			continue
		}
		if len(cfg.Webhooks) != 2 {
			t.Fatalf("install's webhook configuration has %d webhooks, want 2", len(cfg.Webhooks))
		}
		for i := range cfg.Webhooks {
			cfg.Webhooks[i].ClientConfig = admissionregistrationv1.WebhookClientConfig{URL: ptr.To(url), CABundle: caPEM}
		}
		out, err := yaml.Marshal(&cfg)
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	t.Fatal("install writes no MutatingWebhookConfiguration")
	return ""
}

// servingCert issues a certificate for 127.0.0.1 from a CA made for the
// test, and returns the CA (PEM) with it.
func servingCert(t *testing.T) ([]byte, tls.Certificate) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "webhook test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
