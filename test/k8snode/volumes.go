package k8snode

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// file is one file of a volume.
type file struct {
	data []byte
	mode fs.FileMode
}

// defaultMode is a volume file's mode unless the volume says otherwise
// (the API's default, 0644).
const defaultMode = 0o644

func modeOf(item, volume *int32) fs.FileMode {
	switch {
	case item != nil:
		return fs.FileMode(*item)
	case volume != nil:
		return fs.FileMode(*volume)
	}
	return defaultMode
}

// volumeSource computes a volume's files. tokens issues service account
// tokens (cached: see tokenCache).
type volumeSource struct {
	pod    *corev1.Pod
	l      lookups
	tokens func(name string, p *corev1.ServiceAccountTokenProjection) ([]byte, error)
}

// supported reports whether k8snode can give a pod this volume.
func supported(v corev1.Volume) error {
	switch {
	case v.EmptyDir != nil, v.ConfigMap != nil, v.Secret != nil, v.DownwardAPI != nil:
		return nil
	case v.Projected != nil:
		for i, s := range v.Projected.Sources {
			if s.ClusterTrustBundle != nil || s.PodCertificate != nil {
				return fmt.Errorf("volume %s: projected source %d: only serviceAccountToken, configMap, secret and downwardAPI are supported by k8snode", v.Name, i)
			}
		}
		return nil
	}
	return fmt.Errorf("volume %s: only emptyDir, configMap, secret, downwardAPI and projected volumes are supported by k8snode", v.Name)
}

// files is what a file volume holds now; errNotFound (wrapped) while an
// object it needs is missing.
func (s volumeSource) files(v corev1.Volume) (map[string]file, error) {
	out := map[string]file{}
	switch {
	case v.ConfigMap != nil:
		src := v.ConfigMap
		data, err := s.l.configMap(s.pod.Namespace, src.Name)
		return out, keys(out, data, err, "configmap "+src.Name, src.Items, src.Optional, src.DefaultMode)
	case v.Secret != nil:
		src := v.Secret
		data, err := s.l.secret(s.pod.Namespace, src.SecretName)
		return out, keys(out, data, err, "secret "+src.SecretName, src.Items, src.Optional, src.DefaultMode)
	case v.DownwardAPI != nil:
		return out, s.downward(out, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode)
	case v.Projected != nil:
		for i, p := range v.Projected.Sources {
			var err error
			switch {
			case p.ServiceAccountToken != nil:
				var tok []byte
				tok, err = s.tokens(fmt.Sprintf("%s/%d", v.Name, i), p.ServiceAccountToken)
				if err == nil {
					out[p.ServiceAccountToken.Path] = file{tok, modeOf(nil, v.Projected.DefaultMode)}
				}
			case p.ConfigMap != nil:
				data, gerr := s.l.configMap(s.pod.Namespace, p.ConfigMap.Name)
				err = keys(out, data, gerr, "configmap "+p.ConfigMap.Name, p.ConfigMap.Items, p.ConfigMap.Optional, v.Projected.DefaultMode)
			case p.Secret != nil:
				data, gerr := s.l.secret(s.pod.Namespace, p.Secret.Name)
				err = keys(out, data, gerr, "secret "+p.Secret.Name, p.Secret.Items, p.Secret.Optional, v.Projected.DefaultMode)
			case p.DownwardAPI != nil:
				err = s.downward(out, p.DownwardAPI.Items, v.Projected.DefaultMode)
			}
			if err != nil {
				return nil, fmt.Errorf("source %d: %w", i, err)
			}
		}
		return out, nil
	}
	return nil, supported(v)
}

// keys puts a ConfigMap's or Secret's keys (all, or the items) in out.
func keys(out map[string]file, data map[string][]byte, err error, what string, items []corev1.KeyToPath, optional *bool, mode *int32) error {
	opt := optional != nil && *optional
	if errors.Is(err, errNotFound) && opt {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if len(items) == 0 {
		for k, v := range data {
			out[k] = file{v, modeOf(nil, mode)}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if opt {
				continue
			}
			return fmt.Errorf("%s has no key %q", what, it.Key)
		}
		out[it.Path] = file{v, modeOf(it.Mode, mode)}
	}
	return nil
}

func (s volumeSource) downward(out map[string]file, items []corev1.DownwardAPIVolumeFile, mode *int32) error {
	for _, it := range items {
		if it.FieldRef == nil {
			return fmt.Errorf("downwardAPI %s: only fieldRef is supported by k8snode", it.Path)
		}
		v, err := fieldValue(s.pod, it.FieldRef.FieldPath)
		if err != nil {
			return fmt.Errorf("downwardAPI %s: %w", it.Path, err)
		}
		out[it.Path] = file{[]byte(v), modeOf(it.Mode, mode)}
	}
	return nil
}

// tokenCache holds the service account tokens of a pod's volumes, and asks
// for a new one when 80% of the old one's lifetime has passed, or after 24
// hours, as a kubelet does.
type tokenCache struct {
	request func(ctx context.Context, audiences []string, seconds int64) (*authenticationv1.TokenRequest, error)
	now     func() time.Time
	tokens  map[string]cachedToken
}

type cachedToken struct {
	token             string
	issued, expiresAt time.Time
}

// needsRefresh reports whether a token issued at issued and expiring at
// expires must be replaced at now.
func needsRefresh(now, issued, expires time.Time) bool {
	ttl := expires.Sub(issued)
	return now.After(issued.Add(ttl*8/10)) || now.After(issued.Add(24*time.Hour))
}

func (c *tokenCache) get(ctx context.Context, key string, p *corev1.ServiceAccountTokenProjection) ([]byte, error) {
	now := c.now()
	if t, ok := c.tokens[key]; ok && !needsRefresh(now, t.issued, t.expiresAt) {
		return []byte(t.token), nil
	}
	seconds := int64(3600)
	if p.ExpirationSeconds != nil {
		seconds = *p.ExpirationSeconds
	}
	var aud []string
	if p.Audience != "" {
		aud = []string{p.Audience}
	}
	tr, err := c.request(ctx, aud, seconds)
	if err != nil {
		if t, ok := c.tokens[key]; ok && now.Before(t.expiresAt) {
			return []byte(t.token), nil // keep the old one while it lasts
		}
		return nil, fmt.Errorf("token request: %w", err)
	}
	c.tokens[key] = cachedToken{token: tr.Status.Token, issued: now, expiresAt: tr.Status.ExpirationTimestamp.Time}
	return []byte(tr.Status.Token), nil
}

// tokenRequest is the TokenRequest a kubelet makes for a pod's projected
// token: for the pod's service account, bound to the pod.
func tokenRequest(pod *corev1.Pod, audiences []string, seconds int64) *authenticationv1.TokenRequest {
	return &authenticationv1.TokenRequest{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Spec.ServiceAccountName, Namespace: pod.Namespace},
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         audiences,
			ExpirationSeconds: &seconds,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}
}

// digest identifies a volume's content, to rewrite it only when it
// changes.
func digest(files map[string]file) string {
	h := sha256.New()
	for _, name := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%o\x00%d\x00", name, files[name].mode, len(files[name].data))
		h.Write(files[name].data)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// writeVolume lays the files out as a kubelet's atomic writer does: in a
// new timestamped directory, published by renaming the symlink "..data"
// to it, with a symlink per top-level name through "..data". A program
// reading a file sees the old content or the new, never a mix, also
// through the bind mount of the directory into its container.
func writeVolume(dir string, files map[string]file, now time.Time) error {
	for name := range files {
		if name == "" || path.IsAbs(name) || slices.Contains(strings.Split(name, "/"), "..") || strings.HasPrefix(name, "..") {
			return fmt.Errorf("file %q: want a relative path without \"..\"", name)
		}
	}
	ts := ".." + now.UTC().Format("2006_01_02_15_04_05.000000000")
	tsDir := filepath.Join(dir, ts)
	if err := os.Mkdir(tsDir, 0o755); err != nil {
		return err
	}
	for name, f := range files {
		p := filepath.Join(tsDir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, f.data, f.mode); err != nil {
			return err
		}
		if err := os.Chmod(p, f.mode); err != nil { // not the umask's
			return err
		}
	}
	dataLink := filepath.Join(dir, "..data")
	old, _ := os.Readlink(dataLink)
	tmp := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(ts, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dataLink); err != nil {
		return err
	}
	top := map[string]bool{}
	for name := range files {
		first, _, _ := strings.Cut(name, "/")
		top[first] = true
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "..") && !top[e.Name()] {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	for name := range top {
		link := filepath.Join(dir, name)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
			return err
		}
	}
	if old != "" && old != ts {
		return os.RemoveAll(filepath.Join(dir, old))
	}
	return nil
}

// mount is a bind mount into a container's mount namespace.
type mount struct {
	src, dst string
	readOnly bool
}

// mountPlan says how to make a container's mount points exist without
// touching the node's own directories: a missing mount point is made
// inside an overlay on its deepest existing ancestor (whose writes go to
// a tmpfs of the container's mount namespace), or inside a volume mounted
// above it. exists reports whether a path exists on the node; paths are
// absolute, cleaned and free of symlinks.
func mountPlan(mounts []mount, exists func(string) bool) (overlays, mkdirs []string, binds []mount, err error) {
	binds = slices.Clone(mounts)
	// Parents first: a volume mounted inside another is mounted after it.
	slices.SortStableFunc(binds, func(a, b mount) int { return strings.Compare(a.dst, b.dst) })
	under := func(p, dir string) bool { return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/") }
	for i, m := range binds {
		if !path.IsAbs(m.dst) || path.Clean(m.dst) != m.dst {
			return nil, nil, nil, fmt.Errorf("mount path %q: want an absolute, clean path", m.dst)
		}
		if m.dst == "/" {
			return nil, nil, nil, errors.New("mount path /: mounting over the root is not supported by k8snode")
		}
		inVolume := slices.ContainsFunc(binds[:i], func(o mount) bool { return o.dst != m.dst && under(m.dst, o.dst) })
		switch {
		case inVolume:
			mkdirs = append(mkdirs, m.dst)
		case exists(m.dst):
		default:
			a := path.Dir(m.dst)
			for a != "/" && !exists(a) {
				a = path.Dir(a)
			}
			if a == "/" {
				return nil, nil, nil, fmt.Errorf("mount path %s: no parent directory of it exists on the node (other than /): mount it under one that does", m.dst)
			}
			if strings.ContainsAny(a, ",:") {
				return nil, nil, nil, fmt.Errorf("mount path %s: its parent %s cannot be an overlay's lower directory", m.dst, a)
			}
			if !slices.ContainsFunc(overlays, func(o string) bool { return under(a, o) }) {
				overlays = append(overlays, a)
			}
			mkdirs = append(mkdirs, m.dst)
		}
	}
	return overlays, mkdirs, binds, nil
}

// resolvePath resolves the symlinks of the part of p that exists on the
// node (/var/run → /run), keeping the rest as written.
func resolvePath(p string) string {
	p = path.Clean(p)
	missing := ""
	for cur := p; ; cur = path.Dir(cur) {
		if r, err := filepath.EvalSymlinks(cur); err == nil {
			return path.Join(r, missing)
		}
		if cur == "/" {
			return p
		}
		missing = path.Join(path.Base(cur), missing)
	}
}
