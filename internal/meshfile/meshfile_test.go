package meshfile

import (
	"strings"
	"testing"
)

func TestParseExampleAndDefaults(t *testing.T) {
	m, err := Load("../../examples/zero-trust/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if m.Isolation != IsolationNetns || m.TrustDomain != "cluster.local" {
		t.Fatalf("defaults: %+v", m)
	}
	var badge Workload
	for _, w := range m.Workloads {
		if w.Name == "badge-reader" {
			badge = w
		}
	}
	if badge.ServiceAccount != "badge-reader" || badge.ReplicaCount() != 1 || !badge.Injected() {
		t.Fatalf("badge-reader defaults: %+v", badge)
	}
	cp := m.ControlPlane("/state", "198.18.0.1:15012", "127.0.0.1:15014")
	if err := cp.Validate(); err != nil {
		t.Fatalf("the control plane configuration of the example does not validate: %v", err)
	}
	if len(cp.Workloads) != 3 {
		t.Fatalf("declared workloads = %d, want the 3 injected ones", len(cp.Workloads))
	}
	if cp.Services[0].Address != "198.19.0.1" || cp.Services[0].Ports[0].TargetPort != 8080 {
		t.Fatalf("service: %+v", cp.Services[0])
	}
}

func TestProcessIsolation(t *testing.T) {
	m, err := Parse([]byte("apiVersion: trellis.dev/v1\nkind: Mesh\nisolation: process\nworkloads: [{name: a, namespace: n, command: [x], ports: [{port: 15006}]}]\n"), t.TempDir())
	if err != nil {
		t.Fatalf("a process mesh with a port netns reserves for its sidecar: %v", err)
	}
	if m.Isolation != IsolationProcess {
		t.Fatalf("isolation = %q", m.Isolation)
	}
}

func TestParseErrors(t *testing.T) {
	head := "apiVersion: trellis.dev/v1\nkind: Mesh\n"
	w := "workloads: [{name: a, namespace: n, command: [x], labels: {app: a}, ports: [{port: 8080}]}]\n"
	tests := []struct {
		name, yaml string
		want       []string
	}{
		{"unknown field", head + w + "workload: []\n", []string{"workload"}},
		{"kind", "apiVersion: trellis.dev/v1\nkind: ControlPlane\n" + w, []string{"kind", "Mesh"}},
		{"isolation", head + w + "isolation: vm\n", []string{"isolation", "netns"}},
		{"process replicas", head + "isolation: process\nworkloads: [{name: a, namespace: n, command: [x], replicas: 2}]\n", []string{"workloads[0].replicas", "process isolation"}},
		{"process undeclared target port", head + "isolation: process\n" + w + "services: [{name: s, namespace: n, selector: {app: a}, ports: [{port: 80, targetPort: 9090}]}]\n", []string{"services[0].ports[0].targetPort", "workloads[0].ports"}},
		{"process shared port", head + "isolation: process\nworkloads: [{name: a, namespace: n, command: [x], ports: [{port: 80}]}, {name: b, namespace: n, command: [x], ports: [{port: 80}]}]\n", []string{"workloads[1].ports[0].port", "n/a's"}},
		{"no workloads", head, []string{"workloads", "empty"}},
		{"no command", head + "workloads: [{name: a, namespace: n}]\n", []string{"workloads[0].command"}},
		{"replicas", head + "workloads: [{name: a, namespace: n, command: [x], replicas: 0}]\n", []string{"workloads[0].replicas"}},
		{"sidecar port", head + "workloads: [{name: a, namespace: n, command: [x], ports: [{port: 15006}]}]\n", []string{"workloads[0].ports[0].port", "sidecar"}},
		{"protocol", head + "workloads: [{name: a, namespace: n, command: [x], ports: [{port: 80, protocol: htp}]}]\n", []string{"workloads[0].ports[0].protocol"}},
		{"duplicate", head + "workloads: [{name: a, namespace: n, command: [x]}, {name: a, namespace: n, command: [x]}]\n", []string{"workloads[1].name", "twice"}},
		{"selector matches nothing", head + w + "services: [{name: s, namespace: n, selector: {app: b}, ports: [{port: 80}]}]\n", []string{"services[0].selector", "matches no workload"}},
		{"service without ports", head + w + "services: [{name: s, namespace: n, selector: {app: a}}]\n", []string{"services[0].ports"}},
		{"policies dir", head + w + "policies: ./nowhere\n", []string{"policies", "not a directory"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), t.TempDir())
			if err == nil {
				t.Fatal("accepted")
			}
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("apiVersion: trellis.dev/v1\nkind: Mesh\nworkloads: [{name: a, namespace: n, command: [x]}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		m, err := Parse(data, dir)
		if err != nil {
			return
		}
		if err := m.ControlPlane(dir, "127.0.0.1:1", "127.0.0.1:2").Validate(); err != nil {
			t.Fatalf("a valid mesh file gave an invalid control plane configuration: %v", err)
		}
	})
}

func TestParseErrorsControlPlaneChecks(t *testing.T) {
	head := "apiVersion: trellis.dev/v1\nkind: Mesh\nworkloads: [{name: a, namespace: n, command: [x], labels: {app: a}, ports: [{port: 8080}]}]\n"
	for name, tc := range map[string]struct{ yaml, want string }{
		"dotted namespace": {"apiVersion: trellis.dev/v1\nkind: Mesh\nworkloads: [{name: a, namespace: b.c, command: [x]}]\n", "workloads[0].namespace"},
		"dotted service":   {head + "services: [{name: s.t, namespace: n, selector: {app: a}, ports: [{port: 80}]}]\n", "services[0].name"},
		"duplicate port":   {head + "services: [{name: s, namespace: n, selector: {app: a}, ports: [{port: 80}, {port: 80}]}]\n", "listed twice"},
		"unknown protocol": {head + "services: [{name: s, namespace: n, selector: {app: a}, ports: [{port: 80, appProtocol: htp}]}]\n", "appProtocol"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), t.TempDir())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not mention %q", err, tc.want)
			}
		})
	}
}
