package controlplane

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte("apiVersion: trellis.dev/v1\nkind: ControlPlane\n"), "/mesh")
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != filepath.Join("/mesh", ".trellis") || c.Listen != DefaultListen || c.AdminListen != DefaultAdminListen ||
		time.Duration(*c.GracePeriod) != DefaultGracePeriod || c.TrustDomain != "cluster.local" || c.Resources != "" {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestParseConfigErrors(t *testing.T) {
	head := "apiVersion: trellis.dev/v1\nkind: ControlPlane\n"
	tests := []struct {
		name, yaml string
		want       []string // each must appear in the error
	}{
		{"unknown field", head + "listn: 127.0.0.1:1\n", []string{"listn"}},
		{"wrong kind", "apiVersion: trellis.dev/v1\nkind: Mesh\n", []string{"kind", "ControlPlane"}},
		{"bad listen", head + "listen: localhost\n", []string{"listen", "ip:port"}},
		{"same ports", head + "listen: 127.0.0.1:5000\nadminListen: 127.0.0.1:5000\n", []string{"adminListen", "same address"}},
		{"bad duration", head + "gracePeriod: 30\n", []string{"duration"}},
		{"bad trust domain", head + "trustDomain: Not_Valid\n", []string{"trustDomain"}},
		{"workload without account", head + "workloads: [{namespace: a, name: b}]\n", []string{"workloads[0].serviceAccount"}},
		{"control plane identity", head + "workloads: [{namespace: trellis-system, name: x, serviceAccount: trellis-control-plane}]\n", []string{"workloads[0].serviceAccount", "control plane"}},
		{"duplicate workload", head + "workloads: [{namespace: a, name: b, serviceAccount: c}, {namespace: a, name: b, serviceAccount: c}]\n", []string{"workloads[1].name", "twice"}},
		{"bad protocol", head + "workloads: [{namespace: a, name: b, serviceAccount: c, ports: [{port: 80, protocol: htp}]}]\n", []string{"workloads[0].ports[0].protocol", "htp"}},
		{"service without selector", head + "services: [{namespace: a, name: b, ports: [{port: 80}]}]\n", []string{"services[0].selector"}},
		{"service without ports", head + "services: [{namespace: a, name: b, selector: {app: b}}]\n", []string{"services[0].ports"}},
		{"bad port", head + "services: [{namespace: a, name: b, selector: {app: b}, ports: [{port: 70000}]}]\n", []string{"services[0].ports[0].port"}},
		{"duplicate vip", head + "services: [{namespace: a, name: b, selector: {app: b}, address: 198.18.0.1, ports: [{port: 80}]}, {namespace: a, name: c, selector: {app: c}, address: 198.18.0.1, ports: [{port: 80}]}]\n", []string{"services[1].address"}},
		{"bad vip", head + "services: [{namespace: a, name: b, selector: {app: b}, address: nope, ports: [{port: 80}]}]\n", []string{"services[0].address"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml), "/mesh")
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestConfigRegistry(t *testing.T) {
	c, err := ParseConfig([]byte(testConfig), "/mesh")
	if err != nil {
		t.Fatal(err)
	}
	d := c.Registry()
	if len(d.Workloads) != 3 || d.Workloads[0].Ports[0].Protocol != "http" || d.Workloads[1].Ports[0].Protocol != "" {
		t.Fatalf("workloads: %+v", d.Workloads)
	}
	// The port name "http" declares the protocol.
	if p := d.Services[0].Ports[0]; p.Protocol != "http" || p.TargetPort != 8080 {
		t.Fatalf("service port: %+v", p)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(testConfig))
	f.Add([]byte("apiVersion: trellis.dev/v1\nkind: ControlPlane\ngracePeriod: 1s\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data, "/mesh")
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("a parsed configuration does not validate again: %v", err)
		}
		_ = c.Registry()
	})
}
