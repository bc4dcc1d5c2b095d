package proxy

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/identity"
)

// TestPoolLifecycle follows one endpoint's connection pools through a
// certificate rotation and the endpoint leaving the routing table: a pool
// closes exactly when nobody holds it any more, never while a request
// does, and a request that arrives after the endpoint left gets a pool of
// its own rather than none.
func TestPoolLifecycle(t *testing.T) {
	mt := &meshTransport{}
	pe := mt.newPeer("10.0.0.1:15006", spiffeid.RequireFromString(ordersID))
	open := func(want int64) {
		t.Helper()
		if got := mt.pools.Load(); got != want {
			t.Fatalf("%d pools open, want %d", got, want)
		}
	}
	before, after := &identity.SVID{}, &identity.SVID{}

	r1, r2 := pe.acquire(before), pe.acquire(before)
	if r1 != r2 {
		t.Fatal("two requests with one certificate got different pools")
	}
	open(1)
	r3 := pe.acquire(after)
	if r3 == r1 {
		t.Fatal("a request after the rotation got the pool of the old certificate")
	}
	open(2) // the old pool carries r1 and r2 still
	r1.release()
	open(2)
	r2.release()
	open(1) // the last request on the old pool closed it

	pe.retire()
	open(1) // r3 is in flight
	late := pe.acquire(after)
	if late != r3 {
		t.Fatal("a request that resolved its route before the update did not share the pool still open")
	}
	r3.release()
	late.release()
	open(0)
	straggler := pe.acquire(after)
	open(1)
	straggler.release()
	open(0)
	pe.retire() // twice is harmless
	open(0)
}
