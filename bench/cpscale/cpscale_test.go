package main

import (
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/policy"
)

func TestControlPlaneConfigIsValid(t *testing.T) {
	for _, shape := range []meshShape{
		{proxies: 1, workloads: 1, namespaces: 1},
		{proxies: 1000, workloads: 100, namespaces: 10},
		{proxies: 10, workloads: 600, namespaces: 7}, // virtual IPs past 198.18.130.x
	} {
		cfg, err := controlplane.ParseConfig([]byte(shape.controlPlaneConfig()), t.TempDir())
		if err != nil {
			t.Fatalf("%+v: %v", shape, err)
		}
		if len(cfg.Workloads) != shape.workloads || len(cfg.Services) != shape.workloads {
			t.Fatalf("%+v: %d workloads and %d services", shape, len(cfg.Workloads), len(cfg.Services))
		}
	}
}

func TestAuthorizationPolicyParses(t *testing.T) {
	for _, ns := range []string{"ns03", meshid.RootNamespace} {
		set, err := policy.Parse("bench.yaml", []byte(authorizationPolicy("bench-allow", ns)))
		if err != nil {
			t.Fatal(err)
		}
		if len(set.AuthorizationPolicies) != 1 || set.AuthorizationPolicies[0].Metadata.Namespace != ns {
			t.Fatalf("got %+v, want one AuthorizationPolicy in %s", set.AuthorizationPolicies, ns)
		}
	}
}

func TestLeadingVersion(t *testing.T) {
	u := &discoveryv1.Update{Version: "0123456789abcdef", Destinations: []*discoveryv1.Destination{{Service: "w000.ns00", Port: 80}}}
	b, err := proto.Marshal(u)
	if err != nil {
		t.Fatal(err)
	}
	noVersion, err := proto.Marshal(&discoveryv1.Update{Destinations: u.Destinations})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data mem.BufferSlice
		want string
		ok   bool
	}{
		{"one buffer", mem.BufferSlice{mem.SliceBuffer(b)}, u.Version, true},
		{"split in the version", mem.BufferSlice{mem.SliceBuffer(b[:5]), mem.SliceBuffer(b[5:])}, u.Version, true},
		{"no version", mem.BufferSlice{mem.SliceBuffer(noVersion)}, "", false},
		{"truncated", mem.BufferSlice{mem.SliceBuffer(b[:6])}, "", false},
	}
	for _, tc := range tests {
		got, ok := leadingVersion(tc.data)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: got %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestPercentiles(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		in   []time.Duration
		want [3]float64
	}{
		{nil, [3]float64{0, 0, 0}},
		{[]time.Duration{5 * ms}, [3]float64{5, 5, 5}},
		{[]time.Duration{4 * ms, 1 * ms, 3 * ms, 2 * ms}, [3]float64{2, 4, 4}},
		{func() []time.Duration {
			var d []time.Duration
			for i := 100; i >= 1; i-- {
				d = append(d, time.Duration(i)*ms)
			}
			return d
		}(), [3]float64{50, 99, 100}},
	}
	for _, tc := range tests {
		p50, p99, mx := percentiles(tc.in)
		if diff := cmp.Diff(tc.want, [3]float64{p50, p99, mx}); diff != "" {
			t.Errorf("percentiles(%v) (-want +got):\n%s", tc.in, diff)
		}
	}
}

func TestReadProc(t *testing.T) {
	s, err := readProc(os.Getpid())
	if err != nil {
		t.Skipf("no /proc here: %v", err)
	}
	if s.RSSKB <= 0 || s.HWMKB < s.RSSKB {
		t.Fatalf("implausible sample %+v", s)
	}
}
