package discovery

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/identity"
)

func dest(service string, port uint32, eps ...string) *discoveryv1.Destination {
	d := &discoveryv1.Destination{Service: service, Port: port}
	for _, e := range eps {
		d.Endpoints = append(d.Endpoints, &discoveryv1.Endpoint{Address: e, Identity: "spiffe://td/ns/n/sa/s"})
	}
	return d
}

// Incremental updates are merged into what the proxy has, and the proxy
// always applies a whole configuration; after a refusal it accepts only a
// whole update.
func TestApplyMergesIncrementalUpdates(t *testing.T) {
	var applied *discoveryv1.Update
	refuse := false
	c, err := New(Config{Holder: &identity.Holder{}, Apply: func(u *discoveryv1.Update) error {
		if refuse {
			return errors.New("refused")
		}
		applied = u
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	step := func(u *discoveryv1.Update, want ...*discoveryv1.Destination) {
		t.Helper()
		if err := c.apply(u); err != nil {
			t.Fatalf("apply %s: %v", u.GetVersion(), err)
		}
		if diff := cmp.Diff(want, applied.GetDestinations(), protocmp.Transform()); diff != "" {
			t.Fatalf("after %s (-want +got):\n%s", u.GetVersion(), diff)
		}
		if c.Version() != u.GetVersion() {
			t.Fatalf("version %s, want %s", c.Version(), u.GetVersion())
		}
	}
	if err := c.apply(&discoveryv1.Update{Version: "v0", Incremental: true}); err == nil {
		t.Fatal("an incremental update without a base was applied")
	}
	step(&discoveryv1.Update{Version: "v1", Destinations: []*discoveryv1.Destination{dest("b.n", 80, "10.0.0.2:80"), dest("a.n", 80, "10.0.0.1:80")}},
		dest("a.n", 80, "10.0.0.1:80"), dest("b.n", 80, "10.0.0.2:80"))
	step(&discoveryv1.Update{Version: "v2", Incremental: true, Destinations: []*discoveryv1.Destination{dest("a.n", 80, "10.0.0.1:80", "10.0.0.3:80"), dest("c.n", 53)}},
		dest("a.n", 80, "10.0.0.1:80", "10.0.0.3:80"), dest("b.n", 80, "10.0.0.2:80"), dest("c.n", 53))
	step(&discoveryv1.Update{Version: "v3", Incremental: true, RemovedDestinations: []*discoveryv1.DestinationKey{{Service: "b.n", Port: 80}}},
		dest("a.n", 80, "10.0.0.1:80", "10.0.0.3:80"), dest("c.n", 53))

	refuse = true
	if err := c.apply(&discoveryv1.Update{Version: "v4", Incremental: true}); err == nil {
		t.Fatal("a refused update was reported applied")
	}
	refuse = false
	if err := c.apply(&discoveryv1.Update{Version: "v5", Incremental: true}); err == nil {
		t.Fatal("after a refusal, an incremental update was applied on a base the control plane does not know")
	}
	if c.Version() != "v3" {
		t.Fatalf("version after refusals = %s, want v3", c.Version())
	}
	step(&discoveryv1.Update{Version: "v6", Destinations: []*discoveryv1.Destination{dest("a.n", 80)}}, dest("a.n", 80))
}

// TestApplyKeepsEveryOtherField: whatever an update carries besides its
// destinations reaches Apply, from a whole update and from an incremental
// one. The test fails when a field is added to Update and not set here, so
// that a new field cannot be dropped by the merge unnoticed.
func TestApplyKeepsEveryOtherField(t *testing.T) {
	full := &discoveryv1.Update{
		Version:               "v1",
		Workload:              &discoveryv1.Workload{Namespace: "n", Name: "w", ServiceAccount: "w", Labels: map[string]string{"app": "w"}},
		PeerAuthentications:   []*discoveryv1.PeerAuthentication{{Metadata: &discoveryv1.Metadata{Name: "pa", Namespace: "n"}, MtlsMode: "STRICT"}},
		AuthorizationPolicies: []*discoveryv1.AuthorizationPolicy{{Metadata: &discoveryv1.Metadata{Name: "ap", Namespace: "n"}, Action: "ALLOW"}},
		RegistryOnly:          true,
		GatewayRoutes:         []*discoveryv1.GatewayRoute{{Route: "n/r", Path: "/", Service: "a.n", Port: 80}},
	}
	skip := map[string]bool{"destinations": true, "incremental": true, "removed_destinations": true}
	fields := full.ProtoReflect().Descriptor().Fields()
	for i := range fields.Len() {
		if f := fields.Get(i); !skip[string(f.Name())] && !full.ProtoReflect().Has(f) {
			t.Fatalf("Update.%s is not set in this test: set it, and make sure Client.apply passes it on", f.Name())
		}
	}
	var applied *discoveryv1.Update
	c, err := New(Config{Holder: &identity.Holder{}, Apply: func(u *discoveryv1.Update) error { applied = u; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	for _, incremental := range []bool{false, true} {
		u := proto.Clone(full).(*discoveryv1.Update)
		u.Incremental = incremental
		if err := c.apply(u); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(full, applied, protocmp.Transform(), protocmp.IgnoreFields(&discoveryv1.Update{}, "destinations")); diff != "" {
			t.Fatalf("incremental=%v: what Apply got (-want +got):\n%s", incremental, diff)
		}
	}
}
