package k8snode

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/test/k8senv"
)

func TestExpand(t *testing.T) {
	vars := map[string]string{"POD_IP": "198.19.200.2", "NAME": "web", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"plain", "plain"},
		{"$(POD_IP)", "198.19.200.2"},
		{"--advertise-ip=$(POD_IP):$(NAME)", "--advertise-ip=198.19.200.2:web"},
		{"$(UNDEFINED)", "$(UNDEFINED)"},
		{"$$(POD_IP)", "$(POD_IP)"},
		{"$$", "$"},
		{"a$b", "a$b"},
		{"$", "$"},
		{"x$", "x$"},
		{"$(EMPTY)x", "x"},
		{"$(unterminated", "$(unterminated"},
		{"$(NAME)$(NAME)", "webweb"},
	} {
		if got := expand(tc.in, lookup); got != tc.want {
			t.Errorf("expand(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// FuzzExpand: any command line expands without panicking; text without
// a reference stays as written, and undefined references are kept.
func FuzzExpand(f *testing.F) {
	for _, s := range []string{"", "$(A)", "$$(A)", "$(", "a$", "$(A)$(B)x", "$)$($$"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		none := func(string) (string, bool) { return "", false }
		got := expand(s, none)
		if !strings.Contains(s, "$") && got != s {
			t.Errorf("expand(%q) = %q, want it unchanged", s, got)
		}
		if !strings.Contains(s, "$$") && got != s {
			t.Errorf("expand(%q) without variables = %q, want it unchanged", s, got)
		}
	})
}

func TestFieldValue(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-1", Namespace: "shipping", UID: "u-1",
			Labels:      map[string]string{"app": "web", "tier": `a "b"`},
			Annotations: map[string]string{"trellis.dev/proxy-config": "kind: ProxyConfig\n"}},
		Spec:   corev1.PodSpec{ServiceAccountName: "orders-api", NodeName: "k8snode"},
		Status: corev1.PodStatus{PodIP: "198.19.200.2", PodIPs: []corev1.PodIP{{IP: "198.19.200.2"}}, HostIP: "198.19.200.1"},
	}
	for _, tc := range []struct{ path, want string }{
		{"metadata.name", "web-1"},
		{"metadata.namespace", "shipping"},
		{"metadata.uid", "u-1"},
		{"metadata.labels['app']", "web"},
		{"metadata.labels['missing']", ""},
		{"metadata.annotations['trellis.dev/proxy-config']", "kind: ProxyConfig\n"},
		{"metadata.labels", `app="web"` + "\n" + `tier="a \"b\""`},
		{"spec.serviceAccountName", "orders-api"},
		{"spec.nodeName", "k8snode"},
		{"status.podIP", "198.19.200.2"},
		{"status.podIPs", "198.19.200.2"},
		{"status.hostIP", "198.19.200.1"},
	} {
		got, err := fieldValue(pod, tc.path)
		if err != nil || got != tc.want {
			t.Errorf("fieldValue(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
	if _, err := fieldValue(pod, "spec.nonsense"); err == nil {
		t.Error("an unknown field path was accepted")
	}
}

type fakeLookups map[string]map[string][]byte

func (f fakeLookups) configMap(ns, name string) (map[string][]byte, error) {
	if d, ok := f["cm/"+ns+"/"+name]; ok {
		return d, nil
	}
	return nil, errNotFound
}

func (f fakeLookups) secret(ns, name string) (map[string][]byte, error) {
	if d, ok := f["secret/"+ns+"/"+name]; ok {
		return d, nil
	}
	return nil, errNotFound
}

func TestContainerEnv(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-1", Namespace: "shipping"}, Status: corev1.PodStatus{PodIP: "198.19.200.2"}}
	c := &corev1.Container{
		EnvFrom: []corev1.EnvFromSource{{Prefix: "CFG_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		Env: []corev1.EnvVar{
			{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
			{Name: "ADDR", Value: "$(POD_IP):$(PORT)"}, // PORT is defined later: kept as written
			{Name: "PORT", Value: "8080"},
			{Name: "MODE", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "mode"}}},
			{Name: "OPT", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "none"}, Key: "k", Optional: ptr.To(true)}}},
		},
		Command: []string{"serve"},
		Args:    []string{"--listen", "$(POD_IP):$(PORT)", "$$(PORT)"},
	}
	l := fakeLookups{"cm/shipping/cfg": {"mode": []byte("strict")}}
	env, err := containerEnv(pod, c, l)
	if err != nil {
		t.Fatal(err)
	}
	want := []envVar{{"CFG_mode", "strict"}, {"POD_IP", "198.19.200.2"}, {"ADDR", "198.19.200.2:$(PORT)"}, {"PORT", "8080"}, {"MODE", "strict"}, {"OPT", ""}}
	if diff := cmp.Diff(want, env, cmp.AllowUnexported(envVar{})); diff != "" {
		t.Errorf("env (-want +got):\n%s", diff)
	}
	cl := commandLine(c, env)
	if diff := cmp.Diff([]string{"--listen", "198.19.200.2:8080", "$(PORT)"}, cl.Args); diff != "" {
		t.Errorf("args (-want +got):\n%s", diff)
	}
	c.Env = append(c.Env, corev1.EnvVar{Name: "MISSING", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Key: "k"}}})
	if _, err := containerEnv(pod, c, l); err == nil || !strings.Contains(err.Error(), "env MISSING") {
		t.Errorf("a missing ConfigMap: %v, want an error naming the variable", err)
	}
}

func TestPodPhaseAndConditions(t *testing.T) {
	running := corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}
	waiting := corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "PodInitializing"}}
	exited := func(code int32) corev1.ContainerState {
		return corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: code}}
	}
	sidecar := containerSnap{Name: "proxy", Sidecar: true, State: running, Started: true, Ready: true}
	for _, tc := range []struct {
		name  string
		snap  podSnap
		phase corev1.PodPhase
		ready bool
	}{
		{"no network yet", podSnap{Apps: []containerSnap{{State: waiting}}}, corev1.PodPending, false},
		{"initializing", podSnap{SandboxReady: true, Inits: []containerSnap{sidecar}, Apps: []containerSnap{{State: waiting}}}, corev1.PodPending, false},
		{"running, ready", podSnap{SandboxReady: true, Initialized: true, Inits: []containerSnap{sidecar}, Apps: []containerSnap{{State: running, Ready: true}}}, corev1.PodRunning, true},
		{"sidecar not ready", podSnap{SandboxReady: true, Initialized: true, Inits: []containerSnap{{Sidecar: true, State: running, Started: true}}, Apps: []containerSnap{{State: running, Ready: true}}}, corev1.PodRunning, false},
		{"app not ready", podSnap{SandboxReady: true, Initialized: true, Apps: []containerSnap{{State: running}}}, corev1.PodRunning, false},
		{"crash looping", podSnap{RestartPolicy: corev1.RestartPolicyAlways, Initialized: true, Apps: []containerSnap{{State: waiting, Last: exited(1)}}}, corev1.PodRunning, false},
		{"job done", podSnap{RestartPolicy: corev1.RestartPolicyNever, Initialized: true, Apps: []containerSnap{{State: exited(0)}}}, corev1.PodSucceeded, false},
		{"job failed", podSnap{RestartPolicy: corev1.RestartPolicyNever, Initialized: true, Apps: []containerSnap{{State: exited(0)}, {State: exited(2)}}}, corev1.PodFailed, false},
		{"retrying on failure", podSnap{RestartPolicy: corev1.RestartPolicyOnFailure, Initialized: true, Apps: []containerSnap{{State: exited(2)}}}, corev1.PodRunning, false},
		{"init failed", podSnap{RestartPolicy: corev1.RestartPolicyNever, Failed: "init container x exited with code 1", Apps: []containerSnap{{State: waiting}}}, corev1.PodFailed, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := podPhase(tc.snap); got != tc.phase {
				t.Errorf("phase = %s, want %s", got, tc.phase)
			}
			c := podConditions(tc.snap)
			if c[corev1.PodReady] != tc.ready || c[corev1.ContainersReady] != tc.ready {
				t.Errorf("Ready = %v, ContainersReady = %v, want %v", c[corev1.PodReady], c[corev1.ContainersReady], tc.ready)
			}
			if c[corev1.PodInitialized] != tc.snap.Initialized || !c[corev1.PodScheduled] {
				t.Errorf("conditions %v", c)
			}
		})
	}
}

func TestMountPlan(t *testing.T) {
	existing := map[string]bool{"/": true, "/etc": true, "/run": true, "/tmp": true, "/srv": true}
	exists := func(p string) bool { return existing[p] }
	overlays, mkdirs, binds, err := mountPlan([]mount{
		{src: "/n/ca", dst: "/run/trellis/ca", readOnly: true},
		{src: "/n/tmp", dst: "/tmp"},
		{src: "/n/cfg", dst: "/etc/trellis/proxy"},
		{src: "/n/token", dst: "/run/secrets/trellis"},
		{src: "/n/in-tmp", dst: "/tmp/cache/x"},
		{src: "/n/srv", dst: "/srv"},
	}, exists)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"/etc", "/run"}, overlays); diff != "" {
		t.Errorf("overlays (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"/etc/trellis/proxy", "/run/secrets/trellis", "/run/trellis/ca", "/tmp/cache/x"}, mkdirs); diff != "" {
		t.Errorf("mkdirs (-want +got):\n%s", diff)
	}
	var dsts []string
	for _, b := range binds {
		dsts = append(dsts, b.dst)
	}
	if diff := cmp.Diff([]string{"/etc/trellis/proxy", "/run/secrets/trellis", "/run/trellis/ca", "/srv", "/tmp", "/tmp/cache/x"}, dsts); diff != "" {
		t.Errorf("binds (-want +got):\n%s", diff)
	}
	for _, bad := range []string{"/nowhere/at/all", "relative", "/", "/etc/../x"} {
		if _, _, _, err := mountPlan([]mount{{src: "/n", dst: bad}}, exists); err == nil {
			t.Errorf("mount path %q was accepted", bad)
		}
	}
}

func TestContainerScript(t *testing.T) {
	tl := tools{mount: "/bin/mount", mkdir: "/bin/mkdir", chmod: "/bin/chmod", hostname: "/bin/hostname", setpriv: "/bin/setpriv"}
	got := containerScript(scriptSpec{
		tools: tl, scratch: "/var/tmp/k/s", overlays: []string{"/etc"}, mkdirs: []string{"/etc/trellis/proxy"},
		binds: []mount{{src: "/var/tmp/k/v/cfg", dst: "/etc/trellis/proxy", readOnly: true}, {src: "/var/tmp/k/v/it's", dst: "/tmp"}},
		hosts: "/etc/netns/kn-web-1/hosts", hostname: "web", readOnlyRoot: true,
		user: user{uid: 1337, gid: 1337, noNewPriv: true},
	})
	want := `set -e
/bin/mount -t tmpfs -o mode=0700 k8snode /var/tmp/k/s
/bin/mkdir /var/tmp/k/s/u0 /var/tmp/k/s/w0
/bin/mount -t overlay k8snode -o lowerdir=/etc,upperdir=/var/tmp/k/s/u0,workdir=/var/tmp/k/s/w0 /etc
/bin/mkdir -p /etc/trellis/proxy
/bin/chmod a+rx /etc /etc/trellis
/bin/mount --bind /var/tmp/k/v/cfg /etc/trellis/proxy
/bin/mount -o remount,bind,ro /etc/trellis/proxy
/bin/mount --bind '/var/tmp/k/v/it'\''s' /tmp
/bin/mount --bind /etc/netns/kn-web-1/hosts /etc/hosts
/bin/mount -o remount,bind,ro /
/bin/hostname web
cd /
exec /bin/setpriv --reuid=1337 --regid=1337 --clear-groups --no-new-privs --pdeathsig KILL -- "$@"
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("script (-want +got):\n%s", diff)
	}
}

func TestContainerUser(t *testing.T) {
	pod := &corev1.Pod{Spec: corev1.PodSpec{SecurityContext: &corev1.PodSecurityContext{RunAsUser: ptr.To[int64](1000), SupplementalGroups: []int64{5}}}}
	for _, tc := range []struct {
		name string
		sc   *corev1.SecurityContext
		want []string
		err  bool
	}{
		{"the pod's user", nil, []string{"--reuid=1000", "--regid=1000", "--groups=5"}, false},
		{"the container's", &corev1.SecurityContext{RunAsUser: ptr.To[int64](1337), RunAsGroup: ptr.To[int64](1338), AllowPrivilegeEscalation: ptr.To(false)},
			[]string{"--reuid=1337", "--regid=1338", "--groups=5", "--no-new-privs"}, false},
		{"root with two capabilities", &corev1.SecurityContext{RunAsUser: ptr.To[int64](0), Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}, Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"}}},
			[]string{"--bounding-set=-all,+net_admin,+net_raw"}, false},
		{"root refused", &corev1.SecurityContext{RunAsUser: ptr.To[int64](0), RunAsNonRoot: ptr.To(true)}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, err := containerUser(pod, &corev1.Container{SecurityContext: tc.sc})
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if err == nil {
				if diff := cmp.Diff(tc.want, u.setprivArgs()); diff != "" {
					t.Errorf("setpriv (-want +got):\n%s", diff)
				}
			}
		})
	}
}

func TestNeedsRefresh(t *testing.T) {
	issued := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	hour := issued.Add(time.Hour)
	for _, tc := range []struct {
		now  time.Time
		want bool
	}{
		{issued, false},
		{issued.Add(47 * time.Minute), false},
		{issued.Add(49 * time.Minute), true},
		{hour.Add(time.Minute), true},
	} {
		if got := needsRefresh(tc.now, issued, hour); got != tc.want {
			t.Errorf("needsRefresh at %v = %v, want %v", tc.now.Sub(issued), got, tc.want)
		}
	}
	if !needsRefresh(issued.Add(25*time.Hour), issued, issued.Add(365*24*time.Hour)) {
		t.Error("a day-old token with a year to live is not refreshed")
	}
}

func TestWriteVolume(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	if err := writeVolume(dir, map[string]file{"token": {[]byte("one"), 0o600}, "sub/ca.pem": {[]byte("ca"), 0o644}}, now); err != nil {
		t.Fatal(err)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	if read("token") != "one" || read("sub/ca.pem") != "ca" {
		t.Fatalf("token %q, sub/ca.pem %q", read("token"), read("sub/ca.pem"))
	}
	if st, err := os.Stat(filepath.Join(dir, "token")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("token mode %v %v, want 0600", st.Mode(), err)
	}
	// A new version replaces the old whole; a name it drops disappears.
	if err := writeVolume(dir, map[string]file{"token": {[]byte("two"), 0o644}}, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if read("token") != "two" {
		t.Errorf("token after the update: %q", read("token"))
	}
	if _, err := os.Lstat(filepath.Join(dir, "sub")); !os.IsNotExist(err) {
		t.Errorf("sub after the update: %v, want gone", err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 3 { // ..TIMESTAMP, ..data, token
		t.Errorf("volume holds %v, want one version, ..data and token", names)
	}
	if err := writeVolume(dir, map[string]file{"../escape": {[]byte("x"), 0o644}}, now.Add(2*time.Second)); err == nil {
		t.Error("a path out of the volume was written")
	}
}

func TestHostsEntries(t *testing.T) {
	host := netip.MustParseAddr("198.19.200.1")
	svc := netip.MustParseAddr("198.19.64.10")
	got := hostsEntries([]string{"trellis-control-plane.trellis-system.svc"}, host,
		map[types.NamespacedName]netip.Addr{{Namespace: "shipping", Name: "orders-api"}: svc}, "default")
	want := map[string]netip.Addr{
		"trellis-control-plane.trellis-system.svc": host,
		"orders-api.shipping.svc.cluster.local":    svc,
		"orders-api.shipping.svc":                  svc,
		"orders-api.shipping":                      svc,
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("entries from default (-want +got):\n%s", diff)
	}
	if got := hostsEntries(nil, host, map[types.NamespacedName]netip.Addr{{Namespace: "shipping", Name: "orders-api"}: svc}, "shipping"); got["orders-api"] != svc {
		t.Errorf("the bare name in the Service's own namespace: %v", got)
	}
	// A Service named as the test's server does not take its name.
	got = hostsEntries([]string{"cp.trellis-system.svc"}, host, map[types.NamespacedName]netip.Addr{{Namespace: "trellis-system", Name: "cp"}: svc}, "default")
	if got["cp.trellis-system.svc"] != host || got["cp.trellis-system"] != svc {
		t.Errorf("a Service named as a host name: %v", got)
	}
}

// requireNode skips a test that runs pods on a developer machine that
// cannot (not root), and fails it in CI, which can.
func requireNode(t *testing.T, tools ...string) {
	t.Helper()
	err := Available()
	for _, tool := range tools {
		if _, lerr := exec.LookPath(tool); lerr != nil && err == nil {
			err = lerr
		}
	}
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal(err)
	}
	t.Skip(err)
}

// TestNode runs pods of a real API server on the node: a web server
// with a ConfigMap, a downward API volume, a projected token and a
// readiness probe, reached from another pod by its address; a pod whose
// application starts only after its init container and native sidecar; a
// pod of an unknown image, refused with a reason; and deletions, within
// the grace period, leaving nothing behind.
func TestNode(t *testing.T) {
	requireNode(t, "curl")
	const python = "/usr/bin/python3" // root's pyenv shims are not the pods' users'
	if _, err := os.Stat(python); err != nil {
		t.Skipf("%s: %v", python, err)
	}
	env := k8senv.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	node := Start(t, Config{
		Kubeconfig: env.Kubeconfig,
		HostNames:  []string{"test-host.example"},
		Images: map[string]Image{
			"python": Program(python),
			"shell":  Program("/bin/sh"),
		},
	})
	rc, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	kubectl := func(stdin string, args ...string) string {
		t.Helper()
		out, err := env.Kubectl(ctx, stdin, args...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	inPod := func(pod, container string, args ...string) string {
		t.Helper()
		cmd, err := node.Command(ctx, "default", pod, container, args...)
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s in %s: %v\n%s", strings.Join(args, " "), pod, err, out)
		}
		return string(out)
	}
	defer func() {
		if t.Failed() {
			out, _ := env.Kubectl(context.Background(), "", "get", "pods,events", "-A", "-o", "wide")
			t.Logf("cluster:\n%s", out)
		}
	}()
	// Pods need their namespace's service account, which the controller
	// manager makes.
	waitFor(t, ctx, "the default service account", func() bool {
		_, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})

	kubectl(`apiVersion: v1
kind: ConfigMap
metadata: {name: site}
data: {index.html: "hello from k8snode\n"}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  securityContext: {runAsUser: 65534, runAsGroup: 65534}
  containers:
  - name: web
    image: python
    args: ["-m", "http.server", "$(PORT)", "--bind", "$(POD_IP)", "--directory", "/srv/site"]
    env:
    - {name: PORT, value: "8080"}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /index.html, port: http}, periodSeconds: 1}
    volumeMounts:
    - {name: site, mountPath: /srv/site, readOnly: true}
    - {name: info, mountPath: /etc/podinfo}
    - {name: token, mountPath: /var/run/secrets/tokens}
    - {name: scratch, mountPath: /tmp}
  volumes:
  - {name: site, configMap: {name: site}}
  - {name: info, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}
  - {name: token, projected: {sources: [{serviceAccountToken: {audience: test, expirationSeconds: 600, path: token}}]}}
  - {name: scratch, emptyDir: {}}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 2
  securityContext: {runAsUser: 1000}
  containers:
  - name: main
    image: shell
    # Ignores SIGTERM: only the end of its grace period stops it.
    command: ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]
`, "apply", "-f", "-")

	pods, err := node.WaitReady(ctx, "default", "app=web", 1)
	if err != nil {
		t.Fatal(err)
	}
	web := pods[0]
	if _, err := node.WaitReady(ctx, "default", "", 2); err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(web.Status.PodIP)
	if err != nil || !netip.MustParsePrefix("198.18.0.0/15").Contains(ip) {
		t.Fatalf("pod IP %q, want one of 198.18.0.0/15", web.Status.PodIP)
	}
	if web.Status.Phase != corev1.PodRunning || web.Spec.NodeName != node.Name || web.Status.HostIP != node.HostAddr().String() {
		t.Errorf("web: phase %s on node %q (host IP %s), want Running on %s (%s)", web.Status.Phase, web.Spec.NodeName, web.Status.HostIP, node.Name, node.HostAddr())
	}
	if cs := web.Status.ContainerStatuses; len(cs) != 1 || !cs[0].Ready || cs[0].Started == nil || !*cs[0].Started || cs[0].State.Running == nil {
		t.Errorf("web's container status: %+v", cs)
	}

	// Another pod reaches it at its address, across the bridge.
	if got := inPod("client", "main", "curl", "-sS", "-m", "5", "http://"+web.Status.PodIP+":8080/index.html"); got != "hello from k8snode\n" {
		t.Errorf("GET from the client pod: %q", got)
	}
	// Names: the Service's and the host's.
	svc, err := client.CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hosts := inPod("client", "main", "cat", "/etc/hosts")
	for _, want := range []string{svc.Spec.ClusterIP + "\tweb.default.svc.cluster.local", svc.Spec.ClusterIP + "\tweb\n", node.HostAddr().String() + "\ttest-host.example"} {
		if !strings.Contains(hosts, want) {
			t.Errorf("the client's /etc/hosts lacks %q:\n%s", want, hosts)
		}
	}
	// Inside the web container: its user, host name and volumes.
	if got := inPod("web", "web", "sh", "-c", "id -u; hostname; cat /etc/podinfo/labels; echo; touch /tmp/x && echo writable"); got != "65534\nweb\napp=\"web\"\nwritable\n" {
		t.Errorf("in the web container: %q", got)
	}
	claims := jwtClaims(t, inPod("web", "web", "cat", "/var/run/secrets/tokens/token"))
	if !strings.Contains(string(claims), `"aud":["test"]`) || !strings.Contains(string(claims), `"name":"web","uid":"`+string(web.UID)+`"`) {
		t.Errorf("the projected token's claims %s: want audience test, bound to pod web", claims)
	}
	if _, err := os.Stat("/etc/podinfo"); err == nil {
		t.Error("/etc/podinfo exists on the machine: the mount point leaked out of the container")
	}
	// The API server's own token volume is there too.
	if got := inPod("web", "web", "cat", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"); got != "default" {
		t.Errorf("the service account volume's namespace: %q", got)
	}

	t.Run("init container and sidecar first", func(t *testing.T) {
		kubectl(`apiVersion: v1
kind: Pod
metadata: {name: ordered, labels: {app: ordered}}
spec:
  initContainers:
  - name: prepare
    image: shell
    command: ["sh", "-c", "echo prepared > /work/state"]
    volumeMounts: [{name: work, mountPath: /work}]
  - name: helper
    image: python
    restartPolicy: Always
    args: ["-m", "http.server", "9090", "--directory", "/work"]
    startupProbe: {httpGet: {path: /state, port: 9090}, periodSeconds: 1, failureThreshold: 30}
    volumeMounts: [{name: work, mountPath: /work}]
  containers:
  - name: app
    image: shell
    # Exits (and would be restarted) unless the sidecar already serves.
    command: ["sh", "-c", "curl -fsS http://127.0.0.1:9090/state && exec sleep 600"]
  volumes: [{name: work, emptyDir: {}}]
`, "apply", "-f", "-")
		pods, err := node.WaitReady(ctx, "default", "app=ordered", 1)
		if err != nil {
			t.Fatal(err)
		}
		p := pods[0]
		ics := p.Status.InitContainerStatuses
		if len(ics) != 2 || ics[0].State.Terminated == nil || ics[0].State.Terminated.ExitCode != 0 || ics[1].State.Running == nil || !ics[1].Ready {
			t.Errorf("init container statuses: %+v", ics)
		}
		waitFor(t, ctx, "the app's output of what the sidecar served", func() bool {
			log, err := node.Log("default", "ordered", "app")
			return err == nil && strings.Contains(log, "prepared")
		})
		// Had it started before the sidecar served, it would have exited
		// and been restarted.
		p2, err := client.CoreV1().Pods("default").Get(ctx, "ordered", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if cs := p2.Status.ContainerStatuses; len(cs) != 1 || cs[0].RestartCount != 0 || cs[0].State.Running == nil {
			t.Errorf("the application container: %+v", cs)
		}
	})

	t.Run("a job's pod completes, its sidecar stopped", func(t *testing.T) {
		kubectl(`apiVersion: v1
kind: Pod
metadata: {name: job}
spec:
  restartPolicy: Never
  initContainers:
  - {name: helper, image: python, restartPolicy: Always, args: ["-m", "http.server", "9090"], startupProbe: {tcpSocket: {port: 9090}, periodSeconds: 1}}
  containers:
  - {name: work, image: shell, command: ["sh", "-c", "curl -sS -o /dev/null http://127.0.0.1:9090/"]}
`, "apply", "-f", "-")
		var p *corev1.Pod
		waitFor(t, ctx, "the job's pod Succeeded", func() bool {
			var err error
			p, err = client.CoreV1().Pods("default").Get(ctx, "job", metav1.GetOptions{})
			return err == nil && p.Status.Phase == corev1.PodSucceeded
		})
		waitFor(t, ctx, "the sidecar stopped", func() bool {
			p, _ = client.CoreV1().Pods("default").Get(ctx, "job", metav1.GetOptions{})
			ics := p.Status.InitContainerStatuses
			return len(ics) == 1 && ics[0].State.Terminated != nil
		})
		if cs := p.Status.ContainerStatuses; len(cs) != 1 || cs[0].State.Terminated == nil || cs[0].State.Terminated.ExitCode != 0 {
			t.Errorf("the job's container: %+v", cs)
		}
	})

	t.Run("unknown image", func(t *testing.T) {
		kubectl("apiVersion: v1\nkind: Pod\nmetadata: {name: mystery, labels: {app: mystery}}\nspec: {containers: [{name: c, image: registry.example/mystery:1}]}\n", "apply", "-f", "-")
		_, err := node.WaitReady(ctx, "default", "app=mystery", 1)
		if err == nil || !strings.Contains(err.Error(), `image "registry.example/mystery:1" is not known to k8snode`) {
			t.Fatalf("WaitReady: %v, want the unknown image named", err)
		}
		waitFor(t, ctx, "the pod's container waiting with ErrImagePull", func() bool {
			p, err := client.CoreV1().Pods("default").Get(ctx, "mystery", metav1.GetOptions{})
			return err == nil && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].State.Waiting != nil &&
				p.Status.ContainerStatuses[0].State.Waiting.Reason == "ErrImagePull"
		})
	})

	t.Run("deletion", func(t *testing.T) {
		webNetns, err := node.Netns("default", "web")
		if err != nil {
			t.Fatal(err)
		}
		clientNetns, err := node.Netns("default", "client")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		kubectl("", "delete", "pod", "web", "client", "--wait=false")
		for _, name := range []string{"web", "client"} {
			waitFor(t, ctx, "pod "+name+" gone from the API", func() bool {
				_, err := client.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
				return apierrors.IsNotFound(err)
			})
		}
		// The client ignores SIGTERM: it took its grace period (2s) and
		// SIGKILL, not the default 30s.
		if took := time.Since(start); took < 2*time.Second || took > 20*time.Second {
			t.Errorf("deleting the pods took %v, want the client's grace period of 2s and a little", took)
		}
		out, err := exec.Command("ip", "netns", "list").Output()
		if err != nil {
			t.Fatal(err)
		}
		for _, ns := range []string{webNetns, clientNetns} {
			if strings.Contains(string(out), ns) {
				t.Errorf("network namespace %s is left after its pod was deleted", ns)
			}
		}
	})
}

// jwtClaims decodes a JWT's claims (without verifying it: the API server
// issued it).
func jwtClaims(t *testing.T, token string) []byte {
	t.Helper()
	parts := strings.Split(strings.TrimSpace(token), ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", token)
	}
	claims, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var compact map[string]any
	if err := json.Unmarshal(claims, &compact); err != nil {
		t.Fatal(err)
	}
	out, _ := json.Marshal(compact)
	return out
}

// waitFor polls cond until it holds, failing the test at ctx's deadline.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}
