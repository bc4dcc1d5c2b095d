package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/localrun"
)

// nobody is who runs the no-root example when the test runs as root: it
// shows that process isolation needs no privilege at all.
const nobody = 65534

// noRootMesh is `trellis up` of examples/no-root, run without root.
type noRootMesh struct {
	t        *testing.T
	dir      string
	file     string
	bin      string // a copy of the binaries nobody can run
	up       *proc
	stateDir string
}

// asUser runs name as nobody when the test is root, else as itself.
func asUser(name string, args ...string) (string, []string) {
	if os.Geteuid() != 0 {
		return name, args
	}
	return "setpriv", append([]string{"--reuid=" + strconv.Itoa(nobody), "--regid=" + strconv.Itoa(nobody), "--clear-groups", "--", name}, args...)
}

// newNoRootMesh prepares a copy of an example that runs under process
// isolation, with the binaries where an unprivileged user can run them,
// and makes sure nothing of it keeps running after the test.
func newNoRootMesh(t *testing.T, example string) *noRootMesh {
	t.Helper()
	m := &noRootMesh{t: t, dir: copyDir(t, filepath.Join("../../examples", example)), bin: t.TempDir()}
	m.file = filepath.Join(m.dir, "mesh.yaml")
	m.stateDir = filepath.Join(m.dir, ".trellis")
	for _, b := range []string{trellisBin, proxyBin} {
		data, err := os.ReadFile(b)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(m.bin, filepath.Base(b)), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if os.Geteuid() == 0 {
		err := filepath.WalkDir(m.dir, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				return os.Chmod(path, 0o755)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(m.bin, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(m.dir, nobody, nobody); err != nil { // for .trellis and generated files
			t.Fatal(err)
		}
	}
	// Runs after the kill of up that background's cleanup does: a failed
	// test must not leave the programs running, holding their ports.
	t.Cleanup(func() {
		if _, err := localrun.ReadState(m.stateDir); err == nil {
			if r := m.run(filepath.Join(m.bin, "trellis"), "down", "-f", m.file); r.err != nil {
				t.Errorf("trellis down after the test: %v %s", r.err, r.stderr)
			}
		}
	})
	return m
}

// run runs a command as the mesh's user, in the mesh's directory.
func (m *noRootMesh) run(name string, args ...string) result {
	m.t.Helper()
	name, args = asUser(name, args...)
	return run(m.t, m.dir, "", name, args...)
}

// trellis runs the trellis CLI as the mesh's user and fails the test if
// it fails.
func (m *noRootMesh) trellis(args ...string) string {
	m.t.Helper()
	r := m.run(filepath.Join(m.bin, "trellis"), args...)
	if r.err != nil {
		m.t.Fatalf("trellis %s: %v\n%s%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// down stops the mesh with trellis down and waits for up to exit.
func (m *noRootMesh) down() {
	m.t.Helper()
	m.trellis("down", "-f", m.file)
	select {
	case <-m.up.exited:
	case <-time.After(60 * time.Second):
		m.t.Fatal("trellis up did not stop within 60s of trellis down")
	}
}

func (m *noRootMesh) start() {
	m.t.Helper()
	name, args := asUser(filepath.Join(m.bin, "trellis"), "up", "-f", m.file)
	m.up = background(m.t, m.dir, "The mesh is up", name, args...)
}

// exec runs a command as a workload of the mesh would (trellis exec).
func (m *noRootMesh) exec(workload string, args ...string) result {
	m.t.Helper()
	name, full := asUser(filepath.Join(m.bin, "trellis"), append([]string{"exec", "-f", m.file, workload, "--"}, args...)...)
	return run(m.t, m.dir, "", name, full...)
}

// sh runs a shell command as workload would, with its environment.
func (m *noRootMesh) sh(workload, script string) result {
	m.t.Helper()
	return m.exec(workload, "sh", "-c", script)
}

// alive lists the processes a state record names that still run (a
// zombie waiting for its parent to reap it does not).
func alive(st *localrun.State) []int {
	var out []int
	for _, p := range st.Processes {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(p.PID) + "/stat")
		if err != nil {
			continue
		}
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && !strings.HasPrefix(string(stat[i:]), ") Z") {
			out = append(out, p.PID)
		}
	}
	return out
}

// TestUpNoRootExample runs examples/no-root with `trellis up` as an
// unprivileged user (isolation: process): programs call services by name
// through their sidecar as HTTP proxy and on upstream ports, over mutual
// TLS; policies allow checkout only; the workload without sidecar is
// refused by STRICT; Ctrl-C ends everything; after a crash the next up
// ends the leftovers.
func TestUpNoRootExample(t *testing.T) {
	for _, tool := range []string{"curl", "python3", "redis-server", "redis-cli", "setpriv"} {
		requireTool(t, tool)
	}
	m := newNoRootMesh(t, "no-root")
	m.start()

	// By name through the HTTP proxy, and over mTLS: the caller's identity
	// is what the policy allows.
	if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "http://orders-api.shipping/"); r.err != nil || !strings.Contains(r.stdout, "served behind a Trellis sidecar") {
		t.Fatalf("GET from checkout: %v %q %s", r.err, r.stdout, r.stderr)
	}
	r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-i", "-X", "POST", "http://orders-api.shipping.svc.cluster.local/")
	if !strings.Contains(r.stdout, "403 Forbidden") || !strings.Contains(strings.ToLower(r.stdout), "x-trellis-denied-by: no matching allow policy") {
		t.Fatalf("POST from checkout (only GET is allowed):\n%s %s", r.stdout, r.stderr)
	}
	// Any protocol on the upstream port its environment names.
	if r := m.sh("default/checkout", `redis-cli -p "$LEDGER_PAYMENTS_SERVICE_PORT" SET balance 100`); strings.TrimSpace(r.stdout) != "OK" {
		t.Fatalf("redis SET from checkout: %q %v %s", r.stdout, r.err, r.stderr)
	}
	// orders-api is meshed but not allowed; legacy has no sidecar, and its
	// plaintext reaches a sidecar that is STRICT.
	for _, w := range []string{"shipping/orders-api", "default/legacy"} {
		if r := m.sh(w, `redis-cli -p "$LEDGER_PAYMENTS_SERVICE_PORT" GET balance`); strings.Contains(r.stdout, "100") {
			t.Fatalf("%s read the ledger: %q", w, r.stdout)
		}
	}
	if r := m.sh("default/legacy", `curl -sS -m 5 "http://127.0.0.1:$ORDERS_API_SHIPPING_SERVICE_PORT/"`); r.err == nil {
		t.Fatalf("legacy's plaintext request reached orders-api: %q", r.stdout)
	}
	// The workload's sidecar is the one that sent it: the callee's
	// sidecar counts an mTLS request from checkout's identity.
	metrics := m.sh("shipping/orders-api", `curl -sS "http://$TRELLIS_SIDECAR_ADMIN/metrics"`).stdout
	if !strings.Contains(metrics, `source="spiffe://cluster.local/ns/default/sa/checkout-service",status_class="2xx",tls="true"`) {
		t.Fatalf("orders-api's sidecar shows no mTLS request from checkout:\n%s", metrics)
	}
	// The control plane's view of the same traffic.
	name, args := asUser(filepath.Join(m.bin, "trellis"), "stat", "-f", m.file, "-o", "json")
	r = run(t, m.dir, "", name, args...)
	var stats []struct {
		Workload          string
		Meshed            bool
		RequestsPerSecond float64
		SuccessRate       *float64
	}
	if err := json.Unmarshal([]byte(r.stdout), &stats); err != nil {
		t.Fatalf("trellis stat: %v %q %s", err, r.stdout, r.stderr)
	}
	seen := map[string]bool{}
	for _, s := range stats {
		switch {
		case s.Workload == "shipping/orders-api" && s.Meshed && s.RequestsPerSecond > 0 && s.SuccessRate != nil:
			seen[s.Workload] = true
		case s.Workload == "default/legacy" && !s.Meshed:
			seen[s.Workload] = true
		}
	}
	if len(seen) != 2 {
		t.Fatalf("trellis stat lacks orders-api's requests or legacy as unmeshed: %s", r.stdout)
	}
	name, args = asUser(filepath.Join(m.bin, "trellis"), "edges", "-f", m.file)
	if r := run(t, m.dir, "", name, args...); !regexp.MustCompile(`default/checkout\s+shipping/orders-api\s+yes`).MatchString(r.stdout) {
		t.Fatalf("trellis edges does not show checkout → orders-api over mTLS:\n%s%s", r.stdout, r.stderr)
	}
	// A live tap sees checkout's request, path without its query.
	name, args = asUser(filepath.Join(m.bin, "trellis"), "tap", "-f", m.file, "shipping/orders-api", "--max", "1", "-o", "json")
	tap := exec.Command(name, args...)
	tap.Dir = m.dir
	tapOut := &lockedBuffer{}
	tap.Stdout, tap.Stderr = tapOut, tapOut
	if err := tap.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tap.Process.Kill(); _ = tap.Wait() })
	waitFor(t, 10*time.Second, "the tap to start", func() bool { return strings.Contains(tapOut.String(), "Tapping 1 proxies") })
	m.exec("default/checkout", "curl", "-sS", "-m", "5", "http://orders-api.shipping/tapped?token=secret")
	waitFor(t, 10*time.Second, "the tapped request", func() bool { return strings.Contains(tapOut.String(), `"path":"/tapped"`) })
	for _, want := range []string{`"source":"spiffe://cluster.local/ns/default/sa/checkout-service"`, `"mtls":true`, `"decision":"allow"`, `"policy":"shipping/allow-checkout-to-orders"`} {
		if !strings.Contains(tapOut.String(), want) {
			t.Errorf("tap event lacks %s: %s", want, tapOut.String())
		}
	}
	if strings.Contains(tapOut.String(), "secret") {
		t.Errorf("the tap showed the query string: %s", tapOut.String())
	}

	// Which rule allowed checkout's requests.
	name, args = asUser(filepath.Join(m.bin, "trellis"), "authz", "-f", m.file, "shipping/orders-api")
	if r := run(t, m.dir, "", name, args...); !regexp.MustCompile(`shipping/allow-checkout-to-orders\s+0\s+enforced\s+[1-9]`).MatchString(r.stdout) {
		t.Fatalf("trellis authz does not count the allowing rule:\n%s%s", r.stdout, r.stderr)
	}

	// A real Prometheus scrapes the same stats listeners.
	var status struct{ Proxies []struct{ Stats string } }
	name, args = asUser(filepath.Join(m.bin, "trellis"), "status", "-f", m.file, "-o", "json")
	if err := json.Unmarshal([]byte(run(t, m.dir, "", name, args...).stdout), &status); err != nil || len(status.Proxies) != 3 {
		t.Fatalf("trellis status: %v %+v", err, status)
	}
	var statsAddrs []string
	for _, p := range status.Proxies {
		statsAddrs = append(statsAddrs, p.Stats)
	}
	scrapeWithPrometheus(t, m.dir, statsAddrs, "spiffe://cluster.local/ns/shipping/sa/orders-api", func() {
		for range 3 {
			m.exec("default/checkout", "curl", "-sS", "-m", "5", "http://orders-api.shipping/")
		}
	})

	// legacy's refused plaintext is what trellis check warns of; nothing
	// fails in a healthy mesh.
	name, args = asUser(filepath.Join(m.bin, "trellis"), "check", "-f", m.file)
	if r := run(t, m.dir, "", name, args...); r.err != nil || !strings.Contains(r.stdout, "shipping/orders-api refused") || strings.Contains(r.stdout, "FAIL") {
		t.Fatalf("trellis check: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
	if os.Geteuid() == 0 {
		out, err := exec.Command("ps", "-o", "user=", "-u", "root", "-o", "args=").Output()
		if err == nil && strings.Contains(string(out), "http.server 1808") {
			t.Fatalf("a program of the no-root mesh runs as root:\n%s", out)
		}
	}

	// Ctrl-C ends every process and removes the scratch directories.
	st, err := localrun.ReadState(m.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Processes) != 7 {
		t.Fatalf("recorded %d processes, want 7 (4 programs, 3 sidecars)", len(st.Processes))
	}
	if err := m.up.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	<-m.up.exited
	if a := alive(st); len(a) > 0 {
		t.Fatalf("still running after Ctrl-C: %v", a)
	}
	if _, err := os.Stat(filepath.Join(m.stateDir, "run")); !os.IsNotExist(err) {
		t.Fatalf("the run directory is still there: %v", err)
	}

	// A crash leaves the programs running; the next up ends them (or
	// their ports would be taken) and serves again.
	m.start()
	if err := m.up.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-m.up.exited
	crashed, err := localrun.ReadState(m.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(alive(crashed)) == 0 {
		t.Fatal("a killed trellis up left nothing running; this test no longer tests cleanup")
	}
	m.start()
	if a := alive(crashed); len(a) > 0 {
		t.Fatalf("the crashed run's processes still run: %v", a)
	}
	if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "http://orders-api.shipping/"); r.err != nil {
		t.Fatalf("GET after a restart over leftovers: %v %s", r.err, r.stderr)
	}
	name, args = asUser(filepath.Join(m.bin, "trellis"), "down", "-f", m.file)
	if r := run(t, m.dir, "", name, args...); r.err != nil {
		t.Fatalf("trellis down: %v %s", r.err, r.stderr)
	}
	select {
	case <-m.up.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("trellis up did not stop within 60s of trellis down")
	}
}
