package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/test/k8senv"
)

// startCluster starts a real Kubernetes control plane (k8senv) for a test,
// with a context bounding the test's work and a kubectl that fails the
// test when it fails.
func startCluster(t *testing.T, timeout time.Duration) (*k8senv.Env, context.Context, func(stdin string, args ...string) string) {
	t.Helper()
	env := k8senv.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	t.Cleanup(cancel)
	return env, ctx, func(stdin string, args ...string) string {
		t.Helper()
		out, err := env.Kubectl(ctx, stdin, args...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
}

// installTrellis applies trellis install's manifests (test images) and
// waits until the CRDs are established.
func installTrellis(t *testing.T, kubectl func(stdin string, args ...string) string) {
	t.Helper()
	manifests, err := install.Render(install.Options{Image: "r.example/trellis:test", ProxyImage: "r.example/trellis-proxy:test"})
	if err != nil {
		t.Fatal(err)
	}
	kubectl(string(manifests), "apply", "-f", "-")
	kubectl("", "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
}
