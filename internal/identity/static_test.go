package identity_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/identity"
)

func TestWatchFilesReloadsAndKeepsTheLastGoodSet(t *testing.T) {
	cp := startControlPlane(t)
	issue := func() *identity.SVID {
		src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
		if err := src.Fetch(ctx(t)); err != nil {
			t.Fatal(err)
		}
		return src.Current()
	}
	dir := t.TempDir()
	first := issue()
	if err := first.WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	h := &identity.Holder{}
	h.Set(first)
	c, cancel := context.WithCancel(context.Background())
	defer cancel()
	go identity.WatchFiles(c, dir, h, 10*time.Millisecond, testLogger(t))

	// A broken certificate file is not taken.
	if err := os.WriteFile(filepath.Join(dir, identity.CertFile), []byte("half written"), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) {
		if h.Current() != first {
			t.Fatal("an invalid certificate file replaced the current SVID")
		}
		time.Sleep(10 * time.Millisecond) // sample across several reload ticks
	}
	second := issue()
	if err := second.WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for !h.Current().Chain[0].Equal(second.Chain[0]) {
		if time.Now().After(deadline) {
			t.Fatal("renewed files were not picked up")
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}
