package tlsfiles

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestReloader: a value is made again when its files change (not more
// often than Recheck), a change that cannot be used keeps the previous
// value, a first failure is an error, and Still is checked at each use.
func TestReloader(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "v")
	write := func(s string) {
		t.Helper()
		// A different size each time: modification times may not move
		// within the clock's resolution.
		if err := os.WriteFile(f, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	loads := 0
	r := &Reloader[string]{
		Files: []string{f},
		Load: func(time.Time) (string, error) {
			loads++
			b, err := os.ReadFile(f)
			if err != nil {
				return "", err
			}
			if strings.HasPrefix(string(b), "bad") {
				return "", errors.New("unusable")
			}
			return string(b), nil
		},
		Still: func(v string, now time.Time) error {
			if v == "expiring" && now.After(time.Unix(1000, 0)) {
				return errors.New("expired")
			}
			return nil
		},
		Log: slog.New(slog.DiscardHandler), What: "test:",
	}
	at := func(s int64) time.Time { return time.Unix(s, 0) }
	if _, err := r.Get(at(1)); err == nil {
		t.Fatal("a missing file gave a value")
	}
	write("one")
	if v, err := r.Get(at(1)); err == nil || v != "" {
		t.Fatalf("within Recheck the error stays: %q %v", v, err)
	}
	if v, err := r.Get(at(3)); err != nil || v != "one" {
		t.Fatalf("after a change: %q %v", v, err)
	}
	n := loads
	if v, _ := r.Get(at(5)); v != "one" || loads != n {
		t.Fatalf("unchanged files were loaded again (%d loads) or gave %q", loads-n, v)
	}
	write("bad, longer")
	if v, err := r.Get(at(7)); err != nil || v != "one" {
		t.Fatalf("a change that cannot be used: %q %v, want the previous value", v, err)
	}
	write("expiring")
	if v, err := r.Get(at(9)); err != nil || v != "expiring" {
		t.Fatalf("the fixed files: %q %v", v, err)
	}
	if _, err := r.Get(at(2000)); err == nil {
		t.Fatal("Still was not checked on a kept value")
	}
}
