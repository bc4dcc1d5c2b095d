package e2e

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// TestImages builds the images with scripts/build-images (no Docker
// daemon), twice, and checks that they are the same byte for byte; then
// runs the proxy image's init container as a kubelet would — its
// 'trellis-proxy intercept' in the image's own file system, in a network
// namespace of the test — and finds the interception rules installed by
// the image's iptables.
func TestImages(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("needs root (network namespaces, chroot)")
		}
		t.Skip("needs root (network namespaces, chroot)")
	}
	requireTool(t, "apt-get")
	requireTool(t, "dpkg-deb")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	build := func(out string) {
		t.Helper()
		cmd := exec.CommandContext(ctx, "../../scripts/build-images")
		cmd.Env = append(os.Environ(), "OUT="+out, "VERSION=test")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("scripts/build-images: %v\n%s", err, b)
		}
	}
	a, b := t.TempDir(), t.TempDir()
	build(a)
	build(b)
	for _, name := range []string{"trellis.tar", "trellis-proxy.tar"} {
		x, err := os.ReadFile(filepath.Join(a, name))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(b, name))
		if err != nil {
			t.Fatal(err)
		}
		if string(x) != string(y) {
			t.Errorf("%s differs between two builds of the same sources", name)
		}
	}

	root, user, entrypoint := unpackImage(t, filepath.Join(a, "trellis-proxy.tar"))
	if user != "1337:1337" || entrypoint != "/usr/local/bin/trellis-proxy" {
		t.Errorf("proxy image runs %s as %s, want /usr/local/bin/trellis-proxy as 1337:1337", entrypoint, user)
	}
	if _, u, e := unpackImage(t, filepath.Join(a, "trellis.tar")); u != "65532:65532" || e != "/usr/local/bin/trellis" {
		t.Errorf("control plane image runs %s as %s", e, u)
	}

	ns := fmt.Sprintf("trellis-img-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	// As a container runtime would: the image's root, the pod's network
	// namespace, a /dev and a /proc (in a mount namespace of its own).
	inImage := func(args ...string) (string, error) {
		script := `mkdir -p "$0/dev" "$0/proc" && mount --bind /dev "$0/dev" && mount -t proc proc "$0/proc" && exec chroot "$0" "$@"`
		out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, "unshare", "-m", "sh", "-c", script, root}, args...)...).CombinedOutput()
		return string(out), err
	}
	// The injected init container's command line.
	if out, err := inImage("/usr/local/bin/trellis-proxy", "intercept", "--inbound-port", "15006", "--outbound-port", "15001",
		"--proxy-uid", "1337", "--exclude-inbound-ports", "15020"); err != nil {
		t.Fatalf("trellis-proxy intercept in the image: %v\n%s", err, out)
	}
	rules, err := inImage("/usr/sbin/iptables-save", "-t", "nat")
	if err != nil {
		t.Fatalf("iptables-save: %v\n%s", err, rules)
	}
	for _, want := range []string{"-A PREROUTING -p tcp -j TRELLIS_INBOUND", "--uid-owner 1337 -j RETURN", "--dport 15020 -j RETURN", "-j REDIRECT --to-ports 15001"} {
		if !strings.Contains(rules, want) {
			t.Errorf("the rules the image installed lack %q:\n%s", want, rules)
		}
	}
	if v6, err := inImage("/usr/sbin/ip6tables-save", "-t", "nat"); err != nil || !strings.Contains(v6, "TRELLIS_OUTPUT") {
		t.Errorf("ip6tables rules: %v\n%s", err, v6)
	}
}

// unpackImage extracts an OCI layout archive's image into a directory and
// returns it with the image's user and entrypoint.
func unpackImage(t *testing.T, archive string) (root, user, entrypoint string) {
	t.Helper()
	dir := t.TempDir()
	if err := untar(archive, dir); err != nil {
		t.Fatal(err)
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil || len(m.Manifests) != 1 {
		t.Fatalf("index: %v, %d manifests", err, len(m.Manifests))
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	root = t.TempDir()
	rc := mutate.Extract(img)
	defer rc.Close()
	if err := untarReader(rc, root); err != nil {
		t.Fatal(err)
	}
	return root, cf.Config.User, strings.Join(cf.Config.Entrypoint, " ")
}

func untar(archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	return untarReader(f, dir)
}

func untarReader(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		path := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(path, filepath.Clean(dir)+string(os.PathSeparator)) {
			return fmt.Errorf("%s leaves the directory", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(path, os.FileMode(h.Mode)|0o700); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			if err := os.Symlink(h.Linkname, path); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode))
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
}
