package install_test

import (
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
)

// The control plane's configuration file, as the ConfigMap holds it, is
// one the control plane accepts with --kubernetes. (An external test: the
// control plane imports this package.)
func TestRenderedConfigIsValid(t *testing.T) {
	out, err := install.Render(install.Options{Image: "a", ProxyImage: "b"})
	if err != nil {
		t.Fatal(err)
	}
	var text string
	for doc := range strings.SplitSeq(string(out), "---\n") {
		var cm struct {
			Kind string            `json:"kind"`
			Data map[string]string `json:"data"`
		}
		if yaml.Unmarshal([]byte(doc), &cm) == nil && cm.Kind == "ConfigMap" {
			text = cm.Data["control-plane.yaml"]
		}
	}
	cfg, err := controlplane.ParseConfig([]byte(text), "/")
	if err != nil {
		t.Fatalf("the control plane would refuse its configuration: %v\n%s", err, text)
	}
	if !strings.HasPrefix(cfg.Listen, "0.0.0.0:") || !strings.HasPrefix(cfg.AdminListen, "0.0.0.0:") {
		t.Errorf("listening on %s and %s: pods and probes call it from elsewhere", cfg.Listen, cfg.AdminListen)
	}
}
