// Package dirwatch reports changes to the files of a configuration
// directory. It listens to inotify (fsnotify) for promptness and also
// compares the directory's listing (names, sizes, modification times) on a
// slow poll, because inotify misses changes on some filesystems (network
// mounts, some container volumes) and cannot be set up everywhere.
package dirwatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Config configures Watch.
type Config struct {
	Dir string
	// Poll is the interval of the listing comparison; 2 s unless set.
	Poll time.Duration
	// Settle is how long events must stop before OnChange is called, so
	// an editor's write-rename-chmod sequence is one change; 50 ms unless
	// set.
	Settle time.Duration
	// OnChange is called, from Watch's goroutine, after each change.
	OnChange func()
	Log      *slog.Logger
	// Since is the Stamp of the directory the caller last loaded; a
	// difference at start is a change. Empty: the directory as Watch
	// finds it.
	Since string
}

// Stamp summarizes the directory's listing: it changes when a file is
// added, removed, resized or modified. Subdirectories are not read (as
// kubectl apply -f), and neither are names starting with '.', except that
// a ConfigMap mount's "..data" link is followed through its target's
// change, which renames the link.
func Stamp(dir string) string {
	var b strings.Builder
	entries, err := os.ReadDir(dir)
	if err != nil {
		b.WriteString("error:" + err.Error())
	}
	for _, e := range entries {
		fi, err := os.Stat(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		if fi.IsDir() && e.Name() != "..data" {
			continue
		}
		b.WriteString(e.Name())
		b.WriteByte(0)
		b.WriteString(fi.ModTime().UTC().Format(time.RFC3339Nano))
		b.WriteByte(0)
		b.WriteString(strconv.FormatInt(fi.Size(), 10))
		b.WriteByte(0)
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			b.WriteString(target)
		}
		b.WriteByte('\n')
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:8])
}

// Watch calls cfg.OnChange after every change to the directory until ctx
// ends. It always returns nil: when inotify is unavailable it logs why and
// relies on polling.
func Watch(ctx context.Context, cfg Config) error {
	if cfg.Poll == 0 {
		cfg.Poll = 2 * time.Second
	}
	if cfg.Settle == 0 {
		cfg.Settle = 50 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	var events <-chan fsnotify.Event
	var errs <-chan error
	w, err := fsnotify.NewWatcher()
	if err == nil {
		if err = w.Add(cfg.Dir); err != nil {
			w.Close()
		}
	}
	if err != nil {
		cfg.Log.Warn("file notifications unavailable; polling for changes", "dir", cfg.Dir, "every", cfg.Poll, "err", err)
	} else {
		defer w.Close()
		events, errs = w.Events, w.Errors
	}

	last := cfg.Since
	if last == "" {
		last = Stamp(cfg.Dir)
	}
	poll := time.NewTicker(cfg.Poll)
	defer poll.Stop()
	// Check at once: the directory may have changed since the caller
	// loaded it.
	settle := time.NewTimer(0)
	check := func() {
		if s := Stamp(cfg.Dir); s != last {
			last = s
			cfg.OnChange()
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-events:
			settle.Reset(cfg.Settle)
		case err := <-errs:
			cfg.Log.Warn("file notification error; polling continues", "dir", cfg.Dir, "err", err)
		case <-settle.C:
			check()
		case <-poll.C:
			check()
		}
	}
}
