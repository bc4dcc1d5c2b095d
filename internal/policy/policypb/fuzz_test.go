package policypb_test

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
	"github.com/trellis-mesh/trellis/internal/policy/policypb"
)

// FuzzToSet feeds arbitrary updates to ToSet, as a proxy receives them. It
// must never panic; what it accepts must compile as the proxy compiles it,
// and convert back to messages that give the same set again.
func FuzzToSet(f *testing.F) {
	for _, data := range []string{everyField, list} {
		set, err := policy.Parse("seed.yaml", []byte(data))
		if err != nil {
			f.Fatal(err)
		}
		pas, aps := policypb.FromSet(set)
		f.Add(marshal(f, &discoveryv1.Update{PeerAuthentications: pas, AuthorizationPolicies: aps}))
	}
	f.Add(marshal(f, &discoveryv1.Update{
		PeerAuthentications:   []*discoveryv1.PeerAuthentication{validPA(), {}},
		AuthorizationPolicies: []*discoveryv1.AuthorizationPolicy{validAP(), {Metadata: &discoveryv1.Metadata{}, Rules: []*discoveryv1.Rule{{}}}},
	}))
	f.Add([]byte{})
	// Found by fuzzing: an AuthorizationPolicy whose metadata.annotations
	// comes with the wrong wire type (an empty group) decodes to an empty,
	// non-nil map, which a first conversion must already make nil.
	f.Add([]byte("\x22\x0a\x0a\x08\x0a\x01a\x12\x01b\x23\x24"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var u discoveryv1.Update
		if err := proto.Unmarshal(data, &u); err != nil {
			return
		}
		set, err := policypb.ToSet(u.PeerAuthentications, u.AuthorizationPolicies)
		if err != nil {
			if set != nil {
				t.Fatal("ToSet returned a set and an error")
			}
			if !errors.Is(err, policy.ErrInvalid) {
				t.Fatalf("%v does not match policy.ErrInvalid", err)
			}
			return
		}
		if _, err := authz.Compile(set.AuthorizationPolicies, policy.DefaultRootNamespace); err != nil {
			t.Fatalf("accepted policies do not compile: %v", err)
		}
		for _, pa := range set.PeerAuthentications {
			wl := policy.Workload{Namespace: pa.Metadata.Namespace}
			if pa.Spec.Selector != nil {
				wl.Labels = pa.Spec.Selector.MatchLabels
			}
			mtls.ForWorkload(set.PeerAuthentications, policy.DefaultRootNamespace, wl)
		}
		pas, aps := policypb.FromSet(set)
		var again discoveryv1.Update
		if err := proto.Unmarshal(marshal(t, &discoveryv1.Update{PeerAuthentications: pas, AuthorizationPolicies: aps}), &again); err != nil {
			t.Fatal(err)
		}
		set2, err := policypb.ToSet(again.PeerAuthentications, again.AuthorizationPolicies)
		if err != nil {
			t.Fatalf("accepted set rejected after conversion: %v", err)
		}
		if diff := cmp.Diff(set, set2); diff != "" {
			t.Fatalf("conversion is not stable (-first +second):\n%s", diff)
		}
	})
}

func marshal(tb testing.TB, m proto.Message) []byte {
	tb.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}
