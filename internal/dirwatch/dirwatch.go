// Package dirwatch reports changes to the files of a configuration
// directory. It listens to inotify (fsnotify) for promptness and also
// compares the directory's stamp (names and contents) on a slow poll,
// because inotify misses changes on some filesystems (network mounts, some
// container volumes) and cannot be set up everywhere.
package dirwatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
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

// Stamp summarizes the directory: it changes when a file is added,
// removed or has other contents. Contents are hashed rather than
// modification times compared, so an edit is seen even within one tick of
// the file system's clock. Subdirectories are not read (as kubectl apply
// -f), except a mounted ConfigMap's "..data" link, whose target changes on
// every update.
func Stamp(dir string) string {
	h := sha256.New()
	entries, err := os.ReadDir(dir)
	if err != nil {
		h.Write([]byte("error:" + err.Error()))
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		fi, err := os.Stat(path)
		if err != nil {
			continue
		}
		h.Write([]byte(e.Name()))
		h.Write([]byte{0})
		if target, err := os.Readlink(path); err == nil {
			h.Write([]byte(target))
		}
		h.Write([]byte{0})
		switch {
		case fi.IsDir():
		case fi.Size() > maxHashed:
			// Too large to be configuration; the loader will say so.
			// Its size and time still change the stamp.
			h.Write([]byte(fi.ModTime().UTC().Format(time.RFC3339Nano) + strconv.FormatInt(fi.Size(), 10)))
		default:
			if f, err := os.Open(path); err == nil {
				_, _ = io.Copy(h, f)
				f.Close()
			}
		}
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// maxHashed bounds the files Stamp reads.
const maxHashed = 8 << 20

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
