package meshid

import (
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestWorkloadRoundTrip(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, err := Workload(td, "shipping", "orders-api")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := id.String(), "spiffe://cluster.local/ns/shipping/sa/orders-api"; got != want {
		t.Fatalf("Workload = %q, want %q", got, want)
	}
	ns, sa, err := Parse(id)
	if err != nil || ns != "shipping" || sa != "orders-api" {
		t.Fatalf("Parse = %q, %q, %v", ns, sa, err)
	}
}

func TestWorkloadRejectsBadNames(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	for _, tc := range []struct{ ns, sa string }{
		{"", "sa"}, {"ns", ""}, {"Upper", "sa"}, {"ns", "a/b"}, {"-ns", "sa"}, {"ns", "sa-"}, {"ns", "s a"},
	} {
		if _, err := Workload(td, tc.ns, tc.sa); err == nil {
			t.Errorf("Workload(%q, %q) succeeded, want error", tc.ns, tc.sa)
		}
	}
}

func TestParseRejectsNonWorkloadIDs(t *testing.T) {
	for _, s := range []string{
		"spiffe://cluster.local",
		"spiffe://cluster.local/ns/x",
		"spiffe://cluster.local/ns/x/sa/y/z",
		"spiffe://cluster.local/sa/x/ns/y",
		"spiffe://cluster.local/ns/X/sa/y",
	} {
		id := spiffeid.RequireFromString(s)
		if _, _, err := Parse(id); !errors.Is(err, ErrNotWorkload) {
			t.Errorf("Parse(%q) error = %v, want ErrNotWorkload", s, err)
		}
	}
}

func TestControlPlane(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	if got, want := ControlPlane(td).String(), "spiffe://example.org/ns/trellis-system/sa/trellis-control-plane"; got != want {
		t.Fatalf("ControlPlane = %q, want %q", got, want)
	}
}

func TestNamespaceOf(t *testing.T) {
	for in, want := range map[string]string{
		"cluster.local/ns/shipping/sa/orders-api": "shipping",
		"cluster.local/ns/x":                      "x",
		"cluster.local/sa/x":                      "",
		"":                                        "",
	} {
		if got := NamespaceOf(in); got != want {
			t.Errorf("NamespaceOf(%q) = %q, want %q", in, got, want)
		}
	}
}
