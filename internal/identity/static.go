package identity

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// WatchFiles keeps h loaded from the key.pem, cert.pem and bundle.pem in dir
// (as written by WriteFiles, cert-manager or any other tool) until ctx ends:
// when the files change and the new set is valid, it replaces the current
// SVID; a half-written or invalid set is logged and the current one kept,
// as ghostunnel does with its certificates.
func WatchFiles(ctx context.Context, dir string, h *Holder, every time.Duration, log *slog.Logger) {
	last := filesStamp(dir)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stamp := filesStamp(dir)
		if stamp == last {
			continue
		}
		svid, err := LoadFiles(dir, time.Now())
		if err != nil {
			log.Warn("identity files changed but cannot be used yet; keeping the current certificate", "dir", dir, "err", err)
			continue // retried at the next tick, in case the writer was midway
		}
		last = stamp
		h.Set(svid)
		log.Info("identity reloaded from files", "id", svid.ID, "notAfter", svid.NotAfter().UTC())
	}
}

// filesStamp changes whenever one of the identity files is replaced.
func filesStamp(dir string) string {
	var s string
	for _, name := range []string{KeyFile, CertFile, BundleFile} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err == nil {
			s += fi.ModTime().String() + "/" + fi.Name() + "/"
		}
	}
	return s
}
