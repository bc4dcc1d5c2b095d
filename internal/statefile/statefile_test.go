package statefile

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestWriteAtomicReplacesWithPermissions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	if err := WriteAtomic(path, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteAtomic(path, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != "two" {
		t.Fatalf("read back %q, %v", got, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode = %v, want 0600", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
}

func TestLockSerializesReadModifyWrite(t *testing.T) {
	dir := t.TempDir()
	lock := filepath.Join(dir, "lock")
	counter := filepath.Join(dir, "n")
	if err := WriteAtomic(counter, []byte{0}, 0o600); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := Lock(lock)
			if err != nil {
				t.Error(err)
				return
			}
			defer unlock()
			b, err := os.ReadFile(counter)
			if err != nil {
				t.Error(err)
				return
			}
			if err := WriteAtomic(counter, []byte{b[0] + 1}, 0o600); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	b, _ := os.ReadFile(counter)
	if b[0] != 20 {
		t.Fatalf("counter = %d, want 20: lock did not serialize writers", b[0])
	}
}

func TestLockGivesUpOnAStuckHolder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	// Another process's lock: a separate open file description.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = Lock(path)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("Lock with a stuck holder: %v, want ErrLocked", err)
	}
	if took := time.Since(start); took < LockWait {
		t.Fatalf("gave up after %v, before waiting %v", took, LockWait)
	}
}
