package inject

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	proxyconfig "github.com/trellis-mesh/trellis/internal/proxy/config"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var testConfig = Config{ProxyImage: "registry.example/trellis-proxy:test"}

// TestManifestsGolden injects each testdata/*.yaml and compares with its
// .golden twin; go test -update rewrites them (read the diff!).
func TestManifestsGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range inputs {
		if strings.HasSuffix(in, ".golden.yaml") {
			continue
		}
		t.Run(filepath.Base(in), func(t *testing.T) {
			data, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			got, err := testConfig.Manifests(data)
			if err != nil {
				t.Fatal(err)
			}
			golden := strings.TrimSuffix(in, ".yaml") + ".golden.yaml"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("injected %s differs from %s (-want +got):\n%s", in, golden, diff)
			}
			// Injecting what was injected changes nothing.
			again, err := testConfig.Manifests(got)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(string(got), string(again)); diff != "" {
				t.Errorf("injecting twice differs from once (-once +twice):\n%s", diff)
			}
		})
	}
}

// TestProxyConfigIsValid: the configuration the injected proxy reads is
// one the proxy accepts, once it knows its namespace.
func TestProxyConfigIsValid(t *testing.T) {
	var meta metav1.ObjectMeta
	spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{
		{Name: "http-web", ContainerPort: 8080}, {Name: "mysql", ContainerPort: 3306}, {ContainerPort: 7000},
	}, ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http-web")}}}}}}
	if err := testConfig.Pod("orders", &meta, &spec); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(file, []byte(meta.Annotations[ProxyConfigAnnotation]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := proxyconfig.Load(file, "shipping")
	if err != nil {
		t.Fatalf("the injected proxy configuration is invalid: %v\n%s", err, meta.Annotations[ProxyConfigAnnotation])
	}
	if cfg.Transparent.MarksSockets() {
		t.Error("the injected proxy would mark its sockets, which needs a capability it does not have")
	}
	want := []proxyconfig.Inbound{
		{AppPort: 8080, Protocol: proxyconfig.ProtocolHTTP},
		{AppPort: 3306, Protocol: proxyconfig.ProtocolServerFirst},
		{AppPort: 7000, Protocol: proxyconfig.ProtocolSniff},
	}
	if diff := cmp.Diff(want, cfg.Inbound); diff != "" {
		t.Errorf("inbound ports (-want +got):\n%s", diff)
	}
	if got := cfg.AppProbes["app/readyz"]; got.Port != 8080 || got.Path != "/ready" {
		t.Errorf("the readiness probe moved to the proxy as %+v, want port 8080 path /ready", got)
	}
	if g := spec.Containers[0].ReadinessProbe.HTTPGet; g.Port.IntVal != StatsPort || g.Path != "/app-health/app/readyz" {
		t.Errorf("the kubelet probes %s:%s, want the proxy's stats port", g.Port.String(), g.Path)
	}
}

func TestRemoveUndoesInjection(t *testing.T) {
	orig := corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "a"}},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{Name: "migrate", Image: "m"}},
			Containers:     []corev1.Container{{Name: "app", Image: "app"}},
			Volumes:        []corev1.Volume{{Name: "data"}},
		},
	}
	p := *orig.DeepCopy()
	if err := testConfig.Pod("a", &p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	if !Injected(&p.Spec) {
		t.Fatal("Injected is false after injection")
	}
	if p.Spec.InitContainers[0].Name != InitContainer || p.Spec.InitContainers[1].Name != ProxyContainer || p.Spec.InitContainers[2].Name != "migrate" {
		t.Errorf("init containers %v: want the interception, the proxy, then the pod's own", names(p.Spec.InitContainers))
	}
	Remove(&p.ObjectMeta, &p.Spec)
	if diff := cmp.Diff(orig, p); diff != "" {
		t.Errorf("Remove left (-orig +got):\n%s", diff)
	}
}

func names(cs []corev1.Container) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

func TestWanted(t *testing.T) {
	enabled := map[string]string{NamespaceLabel: "enabled"}
	tests := []struct {
		name        string
		nsLabels    map[string]string
		annotations map[string]string
		hostNetwork bool
		want        bool
	}{
		{"namespace enabled", enabled, nil, false, true},
		{"namespace not labelled", nil, nil, false, false},
		{"namespace label other value", map[string]string{NamespaceLabel: "yes"}, nil, false, false},
		{"pod opts in", nil, map[string]string{Annotation: "enabled"}, false, true},
		{"pod opts out of an enabled namespace", enabled, map[string]string{Annotation: "disabled"}, false, false},
		{"pod false", enabled, map[string]string{Annotation: "false"}, false, false},
		{"host network never", enabled, map[string]string{Annotation: "enabled"}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			meta := metav1.ObjectMeta{Annotations: tt.annotations}
			spec := corev1.PodSpec{HostNetwork: tt.hostNetwork}
			if got := Wanted(tt.nsLabels, &meta, &spec); got != tt.want {
				t.Errorf("Wanted = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestManifestErrors(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"bad exclude annotation", `apiVersion: v1
kind: Pod
metadata: {name: p, annotations: {trellis.dev/exclude-inbound-ports: "80,http"}}
spec: {containers: [{name: a, image: a}]}
`, `document 1 (Pod p): annotation trellis.dev/exclude-inbound-ports: "http" is not a port number`},
		{"container takes the sidecar's name", `apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec: {template: {spec: {containers: [{name: trellis-proxy, image: a}]}}}
`, `document 1 (Deployment d): spec.template.spec.containers: a container is named trellis-proxy`},
		{"app on the sidecar's port", `apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {containers: [{name: a, image: a, ports: [{containerPort: 15006}]}]}
`, `spec.containers[0].ports[0]: port 15006 is the sidecar's`},
		{"unknown field is not dropped", `apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec: {template: {spec: {containers: [{name: a, image: a, imagePullPolicyy: Always}]}}}
`, `spec.template.json: unknown field "imagePullPolicyy"`},
		{"second document named", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: q, annotations: {trellis.dev/exclude-outbound-ports: \"0\"}}\nspec: {containers: [{name: a, image: a}]}\n",
			`document 2 (Pod q): annotation trellis.dev/exclude-outbound-ports: "0" is not a port number`},
		{"not YAML", "kind: [", "document 1:"},
		{"app as the sidecar's user", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a, securityContext: {runAsUser: 1337}}]}\n",
			"spec.containers[0].securityContext.runAsUser: 1337 is the sidecar's user"},
		{"pod as the sidecar's user", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {securityContext: {runAsUser: 1337}, containers: [{name: a, image: a}]}\n",
			"spec.securityContext.runAsUser: 1337"},
		{"workload without a valid name", "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: a, image: a}]}\n", "document 1 (Pod Bad_Name): workload name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := testConfig.Manifests([]byte(tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestNoImageIsAnError(t *testing.T) {
	_, err := Config{}.Manifests([]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a}]}\n"))
	if err == nil || !strings.Contains(err.Error(), "no proxy image") {
		t.Fatalf("err = %v", err)
	}
}
