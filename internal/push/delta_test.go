package push

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
)

// TestDeltaKeepsEveryOtherField: an incremental update carries everything
// of its view but the destinations that did not change. The test fails
// when a field is added to Update and not set here, so that deltaFrom
// cannot drop a new field unnoticed.
func TestDeltaKeepsEveryOtherField(t *testing.T) {
	u := &discoveryv1.Update{
		Version:               "v2",
		Workload:              &discoveryv1.Workload{Namespace: "n", Name: "w"},
		PeerAuthentications:   []*discoveryv1.PeerAuthentication{{Metadata: &discoveryv1.Metadata{Name: "pa", Namespace: "n"}, MtlsMode: "STRICT"}},
		AuthorizationPolicies: []*discoveryv1.AuthorizationPolicy{{Metadata: &discoveryv1.Metadata{Name: "ap", Namespace: "n"}}},
		Destinations:          []*discoveryv1.Destination{{Service: "a.n", Port: 80}, {Service: "b.n", Port: 80}},
		RegistryOnly:          true,
		GatewayRoutes:         []*discoveryv1.GatewayRoute{{Route: "n/r", Path: "/", Service: "a.n", Port: 80}},
	}
	skip := map[string]bool{"destinations": true, "incremental": true, "removed_destinations": true}
	fields := u.ProtoReflect().Descriptor().Fields()
	for i := range fields.Len() {
		if f := fields.Get(i); !skip[string(f.Name())] && !u.ProtoReflect().Has(f) {
			t.Fatalf("Update.%s is not set in this test: set it, and make sure deltaFrom carries it", f.Name())
		}
	}
	v := &view{update: u, version: u.Version, dests: newDestTable(u.Destinations)}
	from := newDestTable([]*discoveryv1.Destination{{Service: "a.n", Port: 80}, {Service: "c.n", Port: 80}})
	d := v.deltaFrom(from).update
	want := proto.Clone(u).(*discoveryv1.Update)
	want.Incremental = true
	want.Destinations = []*discoveryv1.Destination{{Service: "b.n", Port: 80}}
	want.RemovedDestinations = []*discoveryv1.DestinationKey{{Service: "c.n", Port: 80}}
	if diff := cmp.Diff(want, d, protocmp.Transform()); diff != "" {
		t.Fatalf("delta (-want +got):\n%s", diff)
	}
}
