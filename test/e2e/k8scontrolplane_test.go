package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
)

// TestKubernetesControlPlane runs 'trellis control-plane --kubernetes'
// outside a real cluster (API server and controller manager 1.34, no
// kubelet) and checks what it does there: it points the injector's
// webhook configuration at itself, so that a Deployment in a labelled
// namespace gets pods with the sidecar; it publishes the trust bundle in
// every namespace; it reports a bad resource in its status; and a proxy
// proving its pod's service account with a projected token gets a
// certificate, registers as its pod, and leaves when the pod is deleted.
func TestKubernetesControlPlane(t *testing.T) {
	env, ctx, kubectl := startCluster(t, 3*time.Minute)
	installTrellis(t, kubectl)

	dir := t.TempDir()
	grpcAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := fmt.Sprintf("apiVersion: trellis.dev/v1\nkind: ControlPlane\nstateDir: state\nlisten: %q\nadminListen: \"127.0.0.1:%d\"\n", grpcAddr, freePort(t))
	if err := os.WriteFile(filepath.Join(dir, "cp.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	startControlPlane := func() *proc {
		return background(t, dir, "sidecar injector serving", trellisBin, "control-plane", "--config", "cp.yaml", "--init",
			"--kubernetes", "--kubeconfig", env.Kubeconfig, "--proxy-image", "r.example/trellis-proxy:test",
			"--webhook-listen", "127.0.0.1:0", "--webhook-url", "auto", "--ca-secret", install.Namespace+"/"+install.CASecret)
	}
	cp := startControlPlane()

	waitFor(t, 30*time.Second, "the webhook configuration pointing at the control plane with its CA", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "mutatingwebhookconfiguration", install.WebhookName, "-o", "jsonpath={.webhooks[0].clientConfig.url} {.webhooks[0].clientConfig.caBundle}")
		f := strings.Fields(out)
		return err == nil && len(f) == 2 && strings.HasPrefix(f[0], "https://127.0.0.1:")
	})

	kubectl(`apiVersion: v1
kind: Namespace
metadata: {name: shipping, labels: {trellis.dev/inject: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: orders-api, namespace: shipping}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: orders-api, namespace: shipping}
spec:
  replicas: 1
  selector: {matchLabels: {app: orders-api}}
  template:
    metadata: {labels: {app: orders-api}}
    spec:
      serviceAccountName: orders-api
      containers: [{name: api, image: r.example/orders-api:1, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: orders-api, namespace: shipping}
spec:
  selector: {app: orders-api}
  ports: [{name: http, port: 80, targetPort: 8080}]
`, "apply", "-f", "-")

	// The controller manager's pod, injected by the control plane.
	var pod struct {
		Metadata struct {
			Name        string            `json:"name"`
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
		Spec struct {
			InitContainers []struct {
				Name string `json:"name"`
			} `json:"initContainers"`
		} `json:"spec"`
	}
	waitFor(t, 60*time.Second, "an injected orders-api pod", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "pods", "-n", "shipping", "-l", "app=orders-api", "-o", "jsonpath={.items[0]}")
		return err == nil && json.Unmarshal([]byte(out), &pod) == nil && len(pod.Spec.InitContainers) == 2
	})
	if pod.Spec.InitContainers[1].Name != inject.ProxyContainer || !strings.Contains(pod.Metadata.Annotations[inject.ProxyConfigAnnotation], "name: orders-api") {
		t.Fatalf("pod %s: init containers %+v, proxy configuration %q", pod.Metadata.Name, pod.Spec.InitContainers, pod.Metadata.Annotations[inject.ProxyConfigAnnotation])
	}

	// The trust bundle, where injected proxies read it.
	var bundle string
	waitFor(t, 30*time.Second, "the trust bundle ConfigMap in shipping", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "configmap", inject.CAConfigMap, "-n", "shipping", "-o", "jsonpath={.data.root-cert\\.pem}")
		bundle = out
		return err == nil && strings.Contains(out, "BEGIN CERTIFICATE")
	})

	// Resources: a valid one accepted, an invalid one reported.
	kubectl(`apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shipping}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  rules: [{from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/checkout"]}}]}]
`, "apply", "-f", "-")
	waitFor(t, 30*time.Second, "the resources' conditions", func() bool {
		pa, _ := env.Kubectl(ctx, "", "get", "peerauthentication", "default", "-n", "shipping", "-o", "jsonpath={.status.conditions[0].status}")
		ap, _ := env.Kubectl(ctx, "", "get", "authorizationpolicy", "bad", "-n", "shipping", "-o", "jsonpath={.status.conditions[0].status}")
		return pa == "True" && ap == "False"
	})
	msg := kubectl("", "get", "authorizationpolicy", "bad", "-n", "shipping", "-o", "jsonpath={.status.conditions[0].message}")
	if !strings.Contains(msg, "spec.rules[0].from[0].source.principals[0]") {
		t.Errorf("the rejected policy's condition %q does not name the field", msg)
	}

	// A proxy for the pod, run here: the pod gets the address the proxy
	// connects from (a pod's proxy connects from its pod's IP), as a
	// kubelet would give it one, and a token bound to it.
	podIP := "127.0.0.1"
	kubectl("", "patch", "pod", pod.Metadata.Name, "-n", "shipping", "--subresource=status", "--type=merge",
		"-p", fmt.Sprintf(`{"status":{"podIP":%q,"podIPs":[{"ip":%q}]}}`, podIP, podIP))
	token := strings.TrimSpace(kubectl("", "create", "token", "orders-api", "-n", "shipping", "--audience", inject.TokenAudience,
		"--bound-object-kind", "Pod", "--bound-object-name", pod.Metadata.Name, "--duration", "10m"))
	files := map[string]string{
		"token":      token,
		"bundle.pem": bundle,
		"proxy.yaml": fmt.Sprintf("apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {name: orders-api}\ninbound:\n  - {listen: \"%s:%d\", appPort: 8080, protocol: http}\n", podIP, freePort(t)),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	background(t, dir, "configuration applied", proxyBin, "--config", "proxy.yaml", "--control-plane", "--identity-addr", grpcAddr,
		"--ca-bundle", "bundle.pem", "--namespace", "shipping", "--service-account", "orders-api",
		"--kubernetes-token-file", "token", "--instance", pod.Metadata.Name, "--advertise-ip", podIP,
		"--admin-addr", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	status := func() string {
		r := run(t, dir, "", trellisBin, "status", "--state-dir", filepath.Join(dir, "state"))
		return r.stdout + r.stderr
	}
	waitFor(t, 30*time.Second, "the proxy listed by trellis status as its pod", func() bool {
		return strings.Contains(status(), "shipping/orders-api/"+pod.Metadata.Name)
	})

	// The pod is deleted (there is no kubelet to finish it): its proxy's
	// registration goes with it.
	kubectl("", "delete", "pod", pod.Metadata.Name, "-n", "shipping", "--grace-period=0", "--force")
	waitFor(t, 30*time.Second, "the deleted pod's instance gone from the registry", func() bool {
		return !strings.Contains(status(), "shipping/orders-api/"+pod.Metadata.Name)
	})

	// The CA is kept in its Secret: a control plane whose state directory
	// is gone (a new pod's emptyDir) comes back with the same CA.
	waitFor(t, 30*time.Second, "the CA in its secret", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "secret", install.CASecret, "-n", install.Namespace, "-o", "jsonpath={.data.ca\\.json}")
		return err == nil && out != ""
	})
	_ = cp.cmd.Process.Kill()
	<-cp.exited
	if err := os.RemoveAll(filepath.Join(dir, "state")); err != nil {
		t.Fatal(err)
	}
	startControlPlane()
	kubectl("apiVersion: v1\nkind: Namespace\nmetadata: {name: billing}\n", "apply", "-f", "-")
	var after string
	waitFor(t, 30*time.Second, "the trust bundle published in a namespace made after the restart", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "configmap", inject.CAConfigMap, "-n", "billing", "-o", "jsonpath={.data.root-cert\\.pem}")
		after = out
		return err == nil && out != ""
	})
	if after != bundle {
		t.Errorf("after a restart with an empty state directory the trust bundle changed:\nbefore %s\nafter %s", bundle, after)
	}
}

// TestKubernetesUserRoot: a control plane given a kubernetes.io/tls
// Secret (as cert-manager keeps a CA) makes its CA from that root: the
// trust bundle it publishes is that root.
func TestKubernetesUserRoot(t *testing.T) {
	env, ctx, _ := startCluster(t, 2*time.Minute)
	dir := t.TempDir()
	for _, args := range [][]string{
		{"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", "/CN=user root",
			"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
			"-keyout", "root.key", "-out", "root.pem"},
	} {
		if r := run(t, dir, "", requireTool(t, "openssl"), args...); r.err != nil {
			t.Fatalf("openssl: %v\n%s", r.err, r.stderr)
		}
	}
	inst := run(t, dir, "", trellisBin, "install", "--image", "r.example/trellis:test", "--proxy-image", "r.example/trellis-proxy:test",
		"--root-cert", "root.pem", "--root-key", "root.key")
	if inst.err != nil {
		t.Fatalf("trellis install: %v\n%s", inst.err, inst.stderr)
	}
	if _, err := env.Kubectl(ctx, inst.stdout, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("apiVersion: trellis.dev/v1\nkind: ControlPlane\nstateDir: state\nlisten: \"127.0.0.1:%d\"\nadminListen: \"127.0.0.1:%d\"\n", freePort(t), freePort(t))
	if err := os.WriteFile(filepath.Join(dir, "cp.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	background(t, dir, "control plane serving", trellisBin, "control-plane", "--config", "cp.yaml", "--init",
		"--kubernetes", "--kubeconfig", env.Kubeconfig, "--root-secret", install.Namespace+"/"+install.RootSecret)
	root, err := os.ReadFile(filepath.Join(dir, "root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	var published string
	waitFor(t, 30*time.Second, "the trust bundle in trellis-system", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "configmap", inject.CAConfigMap, "-n", install.Namespace, "-o", "jsonpath={.data.root-cert\\.pem}")
		published = out
		return err == nil && out != ""
	})
	if strings.TrimSpace(published) != strings.TrimSpace(string(root)) {
		t.Errorf("published bundle:\n%s\nwant the user's root:\n%s", published, root)
	}
}

// TestKubernetesControlPlanes: several control planes (trellis install
// --ha) share one CA — the first creates it and keeps it in its Secret,
// the others take it — so a proxy trusts whichever it reaches.
func TestKubernetesControlPlanes(t *testing.T) {
	env, ctx, kubectl := startCluster(t, 2*time.Minute)
	installTrellis(t, kubectl)
	dir := t.TempDir()
	start := func(name string) *proc {
		t.Helper()
		cfg := fmt.Sprintf("apiVersion: trellis.dev/v1\nkind: ControlPlane\nstateDir: %s\nlisten: \"127.0.0.1:%d\"\nadminListen: \"127.0.0.1:%d\"\n", name, freePort(t), freePort(t))
		if err := os.WriteFile(filepath.Join(dir, name+".yaml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		return background(t, dir, "control plane serving", trellisBin, "control-plane", "--config", name+".yaml", "--init",
			"--kubernetes", "--kubeconfig", env.Kubeconfig, "--ca-secret", install.Namespace+"/"+install.CASecret, "--leader-elect")
	}
	a := start("a")
	start("b")
	bundleA, errA := os.ReadFile(filepath.Join(dir, "a", "bundle.pem"))
	bundleB, errB := os.ReadFile(filepath.Join(dir, "b", "bundle.pem"))
	if errA != nil || errB != nil || len(bundleA) == 0 || string(bundleA) != string(bundleB) {
		t.Fatalf("the control planes trust different roots (%v, %v):\n%s\n%s", errA, errB, bundleA, bundleB)
	}
	// One leads (a, which started first), holding the Lease; when it
	// stops, b takes over.
	holder := func() string {
		out, _ := env.Kubectl(ctx, "", "get", "lease", install.CASecret, "-n", install.Namespace, "-o", "jsonpath={.spec.holderIdentity}")
		return out
	}
	var first string
	waitFor(t, 30*time.Second, "a leader", func() bool { first = holder(); return first != "" })
	_ = a.cmd.Process.Signal(os.Interrupt) // released on a clean stop
	<-a.exited
	waitFor(t, 30*time.Second, "another leader once the first stopped", func() bool { h := holder(); return h != "" && h != first })
	// Each answers the CLI with the CA it took (b, still running).
	for _, name := range []string{"b"} {
		if r := run(t, dir, "", trellisBin, "status", "--state-dir", filepath.Join(dir, name)); r.err != nil {
			t.Errorf("trellis status of %s: %v\n%s%s", name, r.err, r.stdout, r.stderr)
		}
	}
}
