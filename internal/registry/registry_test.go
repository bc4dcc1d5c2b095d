package registry

import (
	"errors"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var decl = Declarations{
	Workloads: []Workload{
		{Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders", "track": "stable"}, Ports: []WorkloadPort{{Port: 8080, Protocol: "http"}}},
		{Namespace: "shipping", Name: "orders-canary", ServiceAccount: "orders", Labels: map[string]string{"app": "orders", "track": "canary"}, Ports: []WorkloadPort{{Port: 8080}}},
		{Namespace: "web", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders"}},
	},
	Services: []Service{
		{Namespace: "shipping", Name: "orders", Selector: map[string]string{"app": "orders"}, Address: "198.18.128.1",
			Ports: []ServicePort{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "admin", Port: 9000, TargetPort: 9000, Protocol: "tcp"}}},
		{Namespace: "shipping", Name: "stable", Selector: map[string]string{"track": "stable"}, Ports: []ServicePort{{Port: 8080, TargetPort: 8080}}},
	},
}

func TestDestinations(t *testing.T) {
	snap := Snapshot{Declarations: decl, Instances: []Instance{
		{Namespace: "shipping", Workload: "orders", Instance: "a", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "198.18.0.2:8080"}},
		{Namespace: "shipping", Workload: "orders", Instance: "b", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "198.18.0.1:8080"}},
		{Namespace: "shipping", Workload: "orders-canary", Instance: "c", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "198.18.0.3:8080"}},
		// Same labels in another namespace: not selected.
		{Namespace: "web", Workload: "orders", Instance: "d", Identity: "spiffe://td/ns/web/sa/orders", Ports: map[uint32]string{8080: "198.18.0.9:8080"}},
	}}
	ep := func(addr string) Endpoint {
		return Endpoint{Address: addr, Identity: "spiffe://td/ns/shipping/sa/orders"}
	}
	want := []Destination{
		{Service: "orders.shipping", Port: 80, Protocol: "http", Addresses: []string{"198.18.128.1:80"},
			Endpoints: []Endpoint{ep("198.18.0.1:8080"), ep("198.18.0.2:8080"), ep("198.18.0.3:8080")}},
		// No instance serves 9000: a destination without endpoints.
		{Service: "orders.shipping", Port: 9000, Protocol: "tcp", Addresses: []string{"198.18.128.1:9000"}},
		{Service: "stable.shipping", Port: 8080, Protocol: "http", Endpoints: []Endpoint{ep("198.18.0.1:8080"), ep("198.18.0.2:8080")}},
	}
	if diff := cmp.Diff(want, snap.Destinations()); diff != "" {
		t.Fatalf("Destinations (-want +got):\n%s", diff)
	}
}

func TestClaim(t *testing.T) {
	r, err := New(Config{Declarations: decl})
	if err != nil {
		t.Fatal(err)
	}
	id := func(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }
	tests := []struct {
		id       string
		workload string
		ok       bool
	}{
		{"spiffe://td/ns/shipping/sa/orders", "orders", true},
		{"spiffe://td/ns/shipping/sa/orders", "orders-canary", true},
		{"spiffe://td/ns/shipping/sa/billing", "orders", false},
		{"spiffe://td/ns/web/sa/orders", "orders-canary", false},
		{"spiffe://td/ns/shipping/sa/orders", "nope", false},
		{"spiffe://td/not/a/workload", "orders", false},
	}
	for _, tc := range tests {
		_, err := r.Claim(id(tc.id), tc.workload)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrNotAllowed)) {
			t.Errorf("Claim(%s, %s) = %v, want ok=%v", tc.id, tc.workload, err, tc.ok)
		}
	}
}

func TestGraceSessionsAndPersistence(t *testing.T) {
	now := time.Unix(1000, 0)
	changes := 0
	file := filepath.Join(t.TempDir(), "registrations.json")
	cfg := Config{Declarations: decl, GracePeriod: 30 * time.Second, StateFile: file, Now: func() time.Time { return now }, OnChange: func() { changes++ }}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	in := Instance{Namespace: "shipping", Workload: "orders", Instance: "a", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "198.18.0.1:8080"}}
	s1 := register(t, r, in)
	// A reconnect takes the instance over; the old session's disconnect
	// changes nothing.
	s2 := register(t, r, in)
	r.Disconnect(in.Key(), s1, false)
	if got := r.Snapshot().Instances[0].DisconnectedAt; !got.IsZero() {
		t.Fatalf("a stale session disconnected the instance at %v", got)
	}
	if changes != 1 {
		t.Fatalf("changes = %d, want 1 (re-registering the same ports is no change)", changes)
	}
	r.Disconnect(in.Key(), s2, false)
	now = now.Add(29 * time.Second)
	if r.Expire() != 0 {
		t.Fatal("expired within the grace period")
	}
	if err := r.Save(); err != nil {
		t.Fatal(err)
	}
	// Restored after a restart, it is in service for a new grace period.
	now = now.Add(10 * time.Second)
	r2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := r2.Snapshot().Instances; len(got) != 1 || !got[0].DisconnectedAt.Equal(now) {
		t.Fatalf("restored = %+v", got)
	}
	now = now.Add(30 * time.Second)
	if r2.Expire() != 1 || len(r2.Snapshot().Instances) != 0 {
		t.Fatal("not expired after the grace period")
	}
	// Goodbye removes at once.
	s := register(t, r2, in)
	r2.Disconnect(in.Key(), s, true)
	if len(r2.Snapshot().Instances) != 0 {
		t.Fatal("a graceful disconnect kept the instance")
	}
}

func register(t *testing.T, r *Registry, in Instance) uint64 {
	t.Helper()
	s, err := r.Register(in)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// One address is one instance: a connected instance keeps its address; a
// disconnected one gives it up to a newcomer (the address was reused).
func TestAddressConflicts(t *testing.T) {
	r, err := New(Config{Declarations: decl, GracePeriod: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	orders := Instance{Namespace: "shipping", Workload: "orders", Instance: "a", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "10.0.0.5:8080"}}
	web := Instance{Namespace: "web", Workload: "orders", Instance: "x", Identity: "spiffe://td/ns/web/sa/orders", Ports: map[uint32]string{8080: "10.0.0.5:8080"}}
	canary := Instance{Namespace: "shipping", Workload: "orders-canary", Instance: "c", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "10.0.0.5:8080"}}
	s := register(t, r, orders)
	if _, err := r.Register(web); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("another identity took a connected instance's address: %v", err)
	}
	if _, err := r.Register(canary); !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("another instance, even of the same identity, took a connected instance's address: %v", err)
	}
	r.Disconnect(orders.Key(), s, false)
	register(t, r, web)
	for _, in := range r.Snapshot().Instances {
		if in.Key() == orders.Key() {
			t.Fatal("the disconnected instance kept a reused address")
		}
	}
}

// Kubernetes declarations list each workload's pods: a proxy registers as
// its own pod, at its pod's address, and leaves when the pod does.
func TestDeclaredInstances(t *testing.T) {
	pods := Declarations{Workloads: []Workload{{
		Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders"},
		Instances: map[string]DeclaredInstance{
			"orders-7d9-a": {IP: netip.MustParseAddr("10.0.0.5"), ServiceAccount: "orders"},
			"orders-7d9-b": {IP: netip.MustParseAddr("10.0.0.6"), ServiceAccount: "orders"},
			"orders-8ab-c": {IP: netip.MustParseAddr("10.0.0.7"), ServiceAccount: "orders-v2"},
		},
	}}}
	changes := 0
	r, err := New(Config{Declarations: pods, OnChange: func() { changes++ }})
	if err != nil {
		t.Fatal(err)
	}
	inst := func(pod, addr string) Instance {
		return Instance{Namespace: "shipping", Workload: "orders", Instance: pod, Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: addr}}
	}
	for _, tc := range []struct {
		name string
		in   Instance
		ok   bool
	}{
		{"its own pod at its address", inst("orders-7d9-a", "10.0.0.5:8080"), true},
		{"its own pod at another address", inst("orders-7d9-b", "10.0.0.5:8080"), false},
		{"a pod that does not exist", inst("orders-7d9-z", "10.0.0.9:8080"), false},
		{"an unparseable address", inst("orders-7d9-b", "pod-b:8080"), false},
		{"a pod of another service account", inst("orders-8ab-c", "10.0.0.7:8080"), false},
	} {
		_, err := r.Register(tc.in)
		if tc.ok != (err == nil) {
			t.Errorf("%s: err = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrNotAllowed) {
			t.Errorf("%s: err = %v, want ErrNotAllowed", tc.name, err)
		}
	}
	if n := len(r.Snapshot().Instances); n != 1 {
		t.Fatalf("%d instances registered, want 1", n)
	}

	// The pod is deleted: its instance leaves at once, no grace period.
	changes = 0
	gone := pods
	gone.Workloads = []Workload{pods.Workloads[0]}
	gone.Workloads[0].Instances = map[string]DeclaredInstance{"orders-7d9-b": {IP: netip.MustParseAddr("10.0.0.6"), ServiceAccount: "orders"}}
	r.SetDeclarations(gone)
	if n := len(r.Snapshot().Instances); n != 0 || changes != 1 {
		t.Errorf("after the pod's deletion: %d instances, %d changes; want 0 and 1", n, changes)
	}
	// The workload's service account changes: its old proxies cannot stay.
	if _, err := r.Register(inst("orders-7d9-b", "10.0.0.6:8080")); err != nil {
		t.Fatal(err)
	}
	other := gone
	other.Workloads = []Workload{gone.Workloads[0]}
	other.Workloads[0].ServiceAccount = "orders-v2"
	other.Workloads[0].Instances = map[string]DeclaredInstance{"orders-7d9-b": {IP: netip.MustParseAddr("10.0.0.6"), ServiceAccount: "orders-v2"}}
	r.SetDeclarations(other)
	if n := len(r.Snapshot().Instances); n != 0 {
		t.Errorf("after a service account change: %d instances, want 0", n)
	}
	// Claims follow the new declarations.
	if _, err := r.Claim(spiffeid.RequireFromString("spiffe://td/ns/shipping/sa/orders-v2"), "orders"); err != nil {
		t.Errorf("the new service account's claim: %v", err)
	}
}

// A cluster's pods are endpoints once ready — their proxy registers
// before the application runs — whether or not their proxy is connected
// to this control plane (several replicas share the proxies).
func TestOnlyReadyPodsAreEndpoints(t *testing.T) {
	d := Declarations{
		Workloads: []Workload{{Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders"},
			Instances: map[string]DeclaredInstance{
				"a": {IP: netip.MustParseAddr("10.0.0.5"), ServiceAccount: "orders", Ready: true, Identity: "spiffe://td/ns/shipping/sa/orders"},
				"b": {IP: netip.MustParseAddr("10.0.0.6"), ServiceAccount: "orders", Identity: "spiffe://td/ns/shipping/sa/orders"},
				"c": {IP: netip.MustParseAddr("10.0.0.7"), ServiceAccount: "orders-v2", Ready: true, Identity: "spiffe://td/ns/shipping/sa/orders-v2"},
			}}},
		Services: []Service{{Namespace: "shipping", Name: "orders", Selector: map[string]string{"app": "orders"}, Ports: []ServicePort{{Port: 80, TargetPort: 8080}}}},
	}
	// Only b's proxy is connected here.
	snap := Snapshot{Declarations: d, Instances: []Instance{
		{Namespace: "shipping", Workload: "orders", Instance: "b", Identity: "spiffe://td/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "10.0.0.6:8080"}},
	}}
	want := []Destination{{Service: "orders.shipping", Port: 80, Endpoints: []Endpoint{
		{Address: "10.0.0.5:8080", Identity: "spiffe://td/ns/shipping/sa/orders"},
		{Address: "10.0.0.7:8080", Identity: "spiffe://td/ns/shipping/sa/orders-v2"},
	}}}
	if diff := cmp.Diff(want, snap.Destinations()); diff != "" {
		t.Fatalf("destinations (-want +got):\n%s", diff)
	}
}
