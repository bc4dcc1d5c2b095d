package dirwatch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestStampSeesSameSizeEdits(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "a.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(f, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("mode: STRICT")
	before := Stamp(dir)
	fi, _ := os.Stat(f)
	write("mode: STRUCT") // same size
	if err := os.Chtimes(f, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if Stamp(dir) == before {
		t.Fatal("an edit of the same size and time did not change the stamp")
	}
	if again := Stamp(dir); again != Stamp(dir) {
		t.Fatal("the stamp is not stable")
	}
}

// Watch reports a change made while it runs, and one made between the
// caller's load (Since) and the start of the watch.
func TestWatchReportsChanges(t *testing.T) {
	for _, poll := range []time.Duration{0, 20 * time.Millisecond} {
		dir := t.TempDir()
		since := Stamp(dir)
		if err := os.WriteFile(filepath.Join(dir, "early.yaml"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		changes := make(chan struct{}, 10)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() {
			done <- Watch(ctx, Config{Dir: dir, Since: since, Poll: poll, OnChange: func() { changes <- struct{}{} }})
		}()
		wait := func(what string) {
			t.Helper()
			select {
			case <-changes:
			case <-time.After(10 * time.Second):
				t.Fatalf("no change reported for %s", what)
			}
		}
		wait("a file written before the watch started")
		if err := os.WriteFile(filepath.Join(dir, "late.yaml"), []byte("y"), 0o600); err != nil {
			t.Fatal(err)
		}
		wait("a file written during the watch")
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
