package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeanDependencies keeps the sidecar small and its attack surface narrow:
// it runs beside every workload, so it must not link a Kubernetes client,
// the CLI framework, or any control-plane code (the CA's signing keys have
// no business in a workload's process).
func TestLeanDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	forbidden := []string{
		"k8s.io/",
		"sigs.k8s.io/",
		"github.com/spf13/cobra",
		"github.com/trellis-mesh/trellis/internal/ca",
		"github.com/trellis-mesh/trellis/internal/cli",
		"github.com/trellis-mesh/trellis/internal/identityservice",
		"github.com/trellis-mesh/trellis/internal/jointoken",
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if pkg == f || strings.HasPrefix(pkg, f) && (strings.HasSuffix(f, "/") || strings.HasPrefix(pkg, f+"/")) {
				t.Errorf("trellis-proxy links %s (forbidden: %s)", pkg, f)
			}
		}
	}
}
