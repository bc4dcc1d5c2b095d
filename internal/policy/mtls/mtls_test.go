package mtls

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/internal/policy"
)

const root = policy.DefaultRootNamespace

func peerAuth(ns, name string, created time.Time, labels map[string]string, mode policy.MTLSMode, ports map[uint32]policy.MTLSMode) *policy.PeerAuthentication {
	pa := &policy.PeerAuthentication{Metadata: policy.Metadata{Namespace: ns, Name: name, CreationTimestamp: created}}
	if labels != nil {
		pa.Spec.Selector = &policy.Selector{MatchLabels: labels}
	}
	if mode != "" {
		pa.Spec.MTLS = &policy.MTLS{Mode: mode}
	}
	for p, m := range ports {
		if pa.Spec.PortLevelMTLS == nil {
			pa.Spec.PortLevelMTLS = map[uint32]policy.MTLS{}
		}
		pa.Spec.PortLevelMTLS[p] = policy.MTLS{Mode: m}
	}
	return pa
}

func TestScopeOf(t *testing.T) {
	for _, tt := range []struct {
		pa   *policy.PeerAuthentication
		want Scope
	}{
		{peerAuth(root, "a", time.Time{}, nil, "", nil), ScopeMesh},
		{peerAuth("ns", "a", time.Time{}, nil, "", nil), ScopeNamespace},
		{peerAuth("ns", "a", time.Time{}, map[string]string{}, "", nil), ScopeNamespace}, // empty selector = none
		{peerAuth("ns", "a", time.Time{}, map[string]string{"app": "x"}, "", nil), ScopeWorkload},
		{peerAuth(root, "a", time.Time{}, map[string]string{"app": "x"}, "", nil), ScopeWorkload},
	} {
		if got := ScopeOf(tt.pa, root); got != tt.want {
			t.Errorf("ScopeOf(%+v) = %s, want %s", tt.pa.Metadata, got, tt.want)
		}
	}
}

func TestOlder(t *testing.T) {
	t1 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	untimedB := peerAuth("ns", "b", time.Time{}, nil, "", nil)
	untimedA := peerAuth("ns", "a", time.Time{}, nil, "", nil)
	timed := peerAuth("ns", "0", t1, nil, "", nil)
	later := peerAuth("ns", "0", t1.Add(time.Hour), nil, "", nil)
	if Older(untimedA, untimedB) >= 0 || Older(untimedB, timed) >= 0 || Older(timed, later) >= 0 {
		t.Error("expected: no creation time before any, then earlier times, then name order")
	}
}

func TestPortsMatchesResolve(t *testing.T) {
	pas := []*policy.PeerAuthentication{
		peerAuth(root, "mesh", time.Time{}, nil, policy.ModeStrict, nil),
		peerAuth("shop", "web", time.Time{}, map[string]string{"app": "web"}, policy.ModeUnset,
			map[uint32]policy.MTLSMode{8080: policy.ModeDisable, 9090: policy.ModeUnset, 15000: policy.ModePermissive}),
	}
	wl := policy.Workload{Namespace: "shop", Name: "web", Labels: map[string]string{"app": "web"}}
	ports := ForWorkload(pas, root, wl)
	got := map[uint32]policy.MTLSMode{}
	for _, p := range []uint32{80, 8080, 9090, 15000} {
		got[p] = ports.Mode(p)
		if r := Resolve(pas, root, wl, p); r.Mode != got[p] {
			t.Errorf("port %d: Ports says %s, Resolve %s", p, got[p], r.Mode)
		}
	}
	want := map[uint32]policy.MTLSMode{80: policy.ModeStrict, 8080: policy.ModeDisable, 9090: policy.ModeStrict, 15000: policy.ModePermissive}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("modes (-want +got):\n%s", diff)
	}
}

func TestAdmits(t *testing.T) {
	for _, tt := range []struct {
		mode policy.MTLSMode
		cert bool
		want bool
	}{
		{policy.ModeStrict, false, false},
		{policy.ModeStrict, true, true},
		{policy.ModePermissive, false, true},
		{policy.ModePermissive, true, true},
		{policy.ModeDisable, false, true},
		{policy.ModeDisable, true, true},
	} {
		if got := Admits(tt.mode, tt.cert); got != tt.want {
			t.Errorf("Admits(%s, cert=%v) = %v, want %v", tt.mode, tt.cert, got, tt.want)
		}
	}
}

func TestConflicts(t *testing.T) {
	t1 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	meshOld := peerAuth(root, "old", t1, nil, policy.ModeStrict, nil)
	meshNew := peerAuth(root, "new", t1.Add(time.Hour), nil, policy.ModePermissive, nil)
	nsA := peerAuth("shop", "a", time.Time{}, nil, policy.ModeStrict, nil)
	nsB := peerAuth("shop", "b", time.Time{}, nil, policy.ModeStrict, nil)
	other := peerAuth("bank", "a", time.Time{}, nil, policy.ModeStrict, nil)
	web := peerAuth("shop", "web", time.Time{}, map[string]string{"app": "web"}, policy.ModeStrict, nil)
	webV2 := peerAuth("shop", "web-v2", time.Time{}, map[string]string{"app": "web", "v": "2"}, policy.ModeStrict, nil)
	api := peerAuth("shop", "api", time.Time{}, map[string]string{"app": "api"}, policy.ModeStrict, nil)
	got := Conflicts([]*policy.PeerAuthentication{webV2, nsB, meshNew, api, other, web, nsA, meshOld}, root)
	want := []Conflict{
		{Ignored: nsB, Winner: nsA},
		{Ignored: meshNew, Winner: meshOld},
		{Ignored: webV2, Winner: web, Partly: true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("conflicts (-want +got):\n%s", diff)
	}
}
