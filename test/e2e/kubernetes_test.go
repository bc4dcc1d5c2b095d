package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
)

var (
	istioGroup     = regexp.MustCompile(`\b(security|networking)\.istio\.io/v[0-9a-z]+`)
	namespaceField = regexp.MustCompile(`(?m)^\s*namespace:\s*([a-z0-9-]+)\s*$`)
)

// TestKubernetesManifests applies what Trellis writes for Kubernetes to a
// real API server (etcd, kube-apiserver and kube-controller-manager
// 1.34): the install manifests with kubectl, the seeds' policies as
// custom resources, and a Deployment injected by 'trellis inject', whose
// pods the controllers create with the sidecar in them.
func TestKubernetesManifests(t *testing.T) {
	env, ctx, kubectl := startCluster(t, 3*time.Minute)

	// trellis install | kubectl apply -f -, with strict field validation:
	// a field the API does not know fails here.
	inst := run(t, "", "", trellisBin, "install", "--image", "registry.example/trellis:test", "--proxy-image", "registry.example/trellis-proxy:test")
	if inst.err != nil {
		t.Fatalf("trellis install: %v\n%s", inst.err, inst.stderr)
	}
	kubectl(inst.stdout, "apply", "--validate=strict", "-f", "-")
	kubectl("", "wait", "--for=condition=Established", "--timeout=60s",
		"crd/peerauthentications.security.trellis.dev", "crd/authorizationpolicies.security.trellis.dev",
		"crd/serviceentries.networking.trellis.dev", "crd/destinationrules.networking.trellis.dev", "crd/virtualservices.networking.trellis.dev")
	// The control plane's least privilege, as the API server sees it.
	sa := "system:serviceaccount:trellis-system:trellis-control-plane"
	for _, check := range []struct {
		args []string
		want string
	}{
		{[]string{"create", "tokenreviews.authentication.k8s.io"}, "yes"},
		{[]string{"watch", "pods", "--all-namespaces"}, "yes"},
		{[]string{"update", "authorizationpolicies.security.trellis.dev", "--subresource=status", "-n", "shipping"}, "yes"},
		{[]string{"patch", "authorizationpolicies.security.trellis.dev", "--subresource=status", "-n", "shipping"}, "no"},
		{[]string{"get", "secrets", "-n", "shipping"}, "no"},
		{[]string{"update", "secrets/" + install.CASecret, "-n", install.Namespace}, "yes"},
		{[]string{"get", "secrets/other", "-n", install.Namespace}, "no"},
		{[]string{"list", "serviceaccounts", "--all-namespaces"}, "no"},
		{[]string{"list", "customresourcedefinitions"}, "no"},
		{[]string{"update", "configmaps/other", "-n", "shipping"}, "no"},
		{[]string{"delete", "pods", "-n", "shipping"}, "no"},
		{[]string{"update", "authorizationpolicies.security.trellis.dev", "-n", "shipping"}, "no"},
	} {
		out, _ := env.Kubectl(ctx, "", append([]string{"auth", "can-i", "--as", sa}, check.args...)...)
		if got := strings.TrimSpace(out); got != check.want {
			t.Errorf("can the control plane %s? %q, want %q", strings.Join(check.args, " "), got, check.want)
		}
	}

	// The seeds' resources, as users paste them, are accepted as written.
	kubectl("apiVersion: v1\nkind: Namespace\nmetadata: {name: shipping}\n", "apply", "-f", "-")
	seeds, err := filepath.Glob("../../examples/*/policies/*.yaml")
	if err != nil || len(seeds) == 0 {
		t.Fatalf("no example policies found (%v)", err)
	}
	for _, f := range seeds {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		// Files may say security.istio.io (accepted as an alias in
		// files); in the cluster the resources are Trellis' own.
		text := istioGroup.ReplaceAllString(string(data), "$1.trellis.dev/v1")
		if strings.Contains(text, "gateway.networking.k8s.io") {
			continue // Gateway API's own CRDs are not installed here
		}
		for _, m := range namespaceField.FindAllStringSubmatch(text, -1) {
			_, _ = env.Kubectl(ctx, "", "create", "namespace", m[1])
		}
		if _, err := env.Kubectl(ctx, text, "apply", "--validate=strict", "-f", "-"); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	// A mode the schema does not know is refused by the API server, naming
	// the field.
	_, err = env.Kubectl(ctx, "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: typo, namespace: shipping}\nspec: {mtls: {mode: STRIKT}}\n", "apply", "-f", "-")
	if err == nil || !strings.Contains(err.Error(), "spec.mtls.mode") {
		t.Errorf("a PeerAuthentication with mode STRIKT: %v, want a refusal naming spec.mtls.mode", err)
	}
	// A field Trellis does not support survives to the control plane
	// (which refuses it) rather than being pruned into a broader rule.
	kubectl(`apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: jwt-only, namespace: shipping}
spec:
  action: ALLOW
  rules: [{from: [{source: {requestPrincipals: ["issuer/subject"]}}]}]
`, "apply", "-f", "-")
	got := kubectl("", "get", "authorizationpolicy", "jwt-only", "-n", "shipping", "-o", "jsonpath={.spec.rules[0].from[0].source}")
	if !strings.Contains(got, "requestPrincipals") {
		t.Errorf("the API server pruned requestPrincipals: source is %q", got)
	}

	// A Deployment injected offline: its pods (made by the real
	// controllers) carry the interception init container and the proxy
	// as a native sidecar, ahead of the application.
	deployment := `apiVersion: apps/v1
kind: Deployment
metadata: {name: orders-api, namespace: shipping}
spec:
  replicas: 2
  selector: {matchLabels: {app: orders-api}}
  template:
    metadata: {labels: {app: orders-api}}
    spec:
      containers: [{name: api, image: registry.example/orders-api:1, ports: [{name: http, containerPort: 8080}]}]
`
	r := run(t, "", deployment, trellisBin, "inject", "-f", "-", "--proxy-image", "registry.example/trellis-proxy:test")
	if r.err != nil {
		t.Fatalf("trellis inject: %v\n%s", r.err, r.stderr)
	}
	kubectl(r.stdout, "apply", "--validate=strict", "-f", "-")
	var pods struct {
		Items []struct {
			Metadata struct {
				Name        string            `json:"name"`
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
			Spec struct {
				InitContainers []struct {
					Name          string `json:"name"`
					RestartPolicy string `json:"restartPolicy"`
				} `json:"initContainers"`
			} `json:"spec"`
		} `json:"items"`
	}
	defer func() {
		if t.Failed() {
			out, _ := env.Kubectl(ctx, "", "get", "deploy,rs,pods,events", "-n", "shipping")
			t.Logf("in namespace shipping:\n%s", out)
		}
	}()
	waitFor(t, 60*time.Second, "the Deployment's two pods", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "pods", "-n", "shipping", "-l", "app=orders-api", "-o", "json")
		if err != nil {
			return false
		}
		return json.Unmarshal([]byte(out), &pods) == nil && len(pods.Items) == 2
	})
	for _, p := range pods.Items {
		ic := p.Spec.InitContainers
		if len(ic) != 2 || ic[0].Name != inject.InitContainer || ic[1].Name != inject.ProxyContainer || ic[1].RestartPolicy != "Always" {
			t.Errorf("pod %s: init containers %+v, want %s then %s (restartPolicy Always)", p.Metadata.Name, ic, inject.InitContainer, inject.ProxyContainer)
		}
		if !strings.Contains(p.Metadata.Annotations[inject.ProxyConfigAnnotation], "appPort: 8080") {
			t.Errorf("pod %s: proxy configuration %q does not declare port 8080", p.Metadata.Name, p.Metadata.Annotations[inject.ProxyConfigAnnotation])
		}
	}
}
