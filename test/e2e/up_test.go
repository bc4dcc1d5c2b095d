package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/localrun"
)

// copyDir copies the files of an example (one level of subdirectories)
// into a fresh directory, so the test can edit them and keep its state
// out of the repository.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.WalkDir(src, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if strings.HasPrefix(rel, ".trellis") {
			return filepath.SkipDir
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	// The programs run unprivileged (nobody) in the mesh directory, which
	// they must be able to reach (t.TempDir's parent is 0700).
	for _, d := range []string{filepath.Dir(dst), dst} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// exampleCopy prepares an example for `trellis up` as root: the tools it
// needs, a copy to edit, and a check when the test ends that nothing of
// the mesh (its prefix) is left on the machine.
func exampleCopy(t *testing.T, example string, tools ...string) (dir, prefix string) {
	t.Helper()
	requireRoot(t)
	for _, tool := range append([]string{"ip", "iptables", "ip6tables", "ss", "setpriv"}, tools...) {
		requireTool(t, tool)
	}
	dir = copyDir(t, filepath.Join("../../examples", example))
	prefix = localrun.Prefix(dir)
	t.Cleanup(func() {
		if l := leftovers(t, prefix); len(l) > 0 {
			t.Errorf("left on the machine after the test: %v", l)
		}
	})
	return dir, prefix
}

// upMesh is a `trellis up` of an example, run by the test.
type upMesh struct {
	t    *testing.T
	dir  string
	file string
	up   *proc
}

func startUp(t *testing.T, dir string) *upMesh {
	t.Helper()
	m := &upMesh{t: t, dir: dir, file: filepath.Join(dir, "mesh.yaml")}
	m.up = background(t, dir, "The mesh is up", trellisBin, "up", "-f", m.file, "--proxy-binary", proxyBin)
	return m
}

// exec runs a command inside a workload's network namespace.
func (m *upMesh) exec(workload string, args ...string) result {
	m.t.Helper()
	return run(m.t, m.dir, "", trellisBin, append([]string{"exec", "-f", m.file, workload, "--"}, args...)...)
}

// stop interrupts `trellis up` as Ctrl-C does and waits for it.
func (m *upMesh) stop() {
	m.t.Helper()
	if err := m.up.cmd.Process.Signal(syscall.SIGINT); err != nil {
		m.t.Fatal(err)
	}
	select {
	case <-m.up.exited:
	case <-time.After(60 * time.Second):
		m.t.Fatal("trellis up did not stop within 60s of SIGINT")
	}
}

// leftovers lists what of the mesh is still on the machine: network
// namespaces, links and hosts-file directories with its prefix.
func leftovers(t *testing.T, prefix string) []string {
	t.Helper()
	var out []string
	ns, _ := exec.Command("ip", "netns", "list").Output()
	links, _ := exec.Command("ip", "-o", "link", "show").Output()
	for _, l := range strings.Split(string(ns)+string(links), "\n") {
		if strings.Contains(l, prefix) {
			out = append(out, l)
		}
	}
	if matches, _ := filepath.Glob("/etc/netns/" + prefix + "*"); len(matches) > 0 {
		out = append(out, matches...)
	}
	return out
}

// TestUpZeroTrustExample runs examples/zero-trust with `trellis up`: every
// workload in its own network namespace with unmodified programs (nginx,
// python3's http.server) calling services by name. checkout may POST
// orders (served by both replicas); anything else gets 403 naming the
// reason; a workload without sidecar cannot reach orders-api at all; a
// policy edit takes effect without restart; Ctrl-C removes everything;
// after a crash, the next up cleans the leftovers and keeps the CA.
func TestUpZeroTrustExample(t *testing.T) {
	dir, prefix := exampleCopy(t, "zero-trust", "curl", "nginx", "python3")
	m := startUp(t, dir)

	// Orders from checkout succeed, spread over both replicas.
	if st, err := localrun.ReadState(filepath.Join(dir, ".trellis")); err != nil || st.Replicas[0].Workload != "shipping/orders-api" {
		t.Fatalf("state: %+v %v", st, err)
	}
	served := map[string]bool{}
	for i := 0; i < 20 && len(served) < 2; i++ {
		r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders")
		if r.err != nil || !strings.HasPrefix(r.stdout, "order accepted by orders-api at 198.1") {
			t.Fatalf("POST from checkout: %v %q %s", r.err, r.stdout, r.stderr)
		}
		served[r.stdout] = true
	}
	if len(served) != 2 {
		t.Errorf("20 orders were served by %d replica(s), want both: %v", len(served), served)
	}
	// The other Kubernetes spelling of the name resolves too.
	if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping.svc.cluster.local/v1/orders"); r.err != nil {
		t.Fatalf("POST to the FQDN: %v %s", r.err, r.stderr)
	}
	// GET is not allowed, and badge-reader may not call at all.
	r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-i", "http://orders-api.shipping/v1/orders")
	if !strings.Contains(r.stdout, "403 Forbidden") || !strings.Contains(strings.ToLower(r.stdout), "x-trellis-denied-by: no matching allow policy") {
		t.Fatalf("GET from checkout:\n%s", r.stdout)
	}
	r = m.exec("default/badge-reader", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "http://orders-api.shipping/v1/orders")
	if r.stdout != "403" {
		t.Fatalf("POST from badge-reader = %q, want 403", r.stdout)
	}
	// legacy has no sidecar: plaintext, which STRICT shipping refuses —
	// neither the service address nor a replica's own address answers.
	r = m.exec("default/legacy", "curl", "-sS", "--connect-timeout", "2", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders")
	if r.err == nil {
		t.Fatalf("legacy reached orders-api through the service: %q", r.stdout)
	}
	st, err := localrun.ReadState(filepath.Join(dir, ".trellis"))
	if err != nil {
		t.Fatal(err)
	}
	r = m.exec("default/legacy", "curl", "-sS", "--connect-timeout", "2", "-m", "5", "-X", "POST", "http://"+st.Replicas[0].Address+":8080/v1/orders")
	if r.err == nil {
		t.Fatalf("legacy reached an orders-api replica directly: %q", r.stdout)
	}

	// Programs run unprivileged: as root they could read the CA's keys or
	// undo their interception rules. (Sidecars run as root.)
	pids := strings.Fields(run(t, "", "", "ip", "netns", "pids", netnsOf(t, dir, "default/legacy")).stdout)
	if len(pids) == 0 {
		t.Fatal("no process in the legacy workload's namespace")
	}
	checked := 0
	for _, pid := range pids {
		status, err := os.ReadFile("/proc/" + pid + "/status")
		if err != nil || strings.Contains(string(status), "Name:\tunshare\n") {
			continue // unshare only waits for the program, in its PID namespace
		}
		checked++
		for _, line := range strings.Split(string(status), "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[0] == "Uid:" && f[1] == "0" {
				t.Errorf("process %s of the legacy workload runs as root", pid)
			}
		}
	}

	if checked == 0 {
		t.Fatal("found no program process in the legacy workload's namespace")
	}

	// A policy edit while the mesh runs: badge-reader may now place orders.
	policy := filepath.Join(dir, "policies", "orders-api.yaml")
	data, err := os.ReadFile(policy)
	if err != nil {
		t.Fatal(err)
	}
	edited := bytes.Replace(data, []byte(`principals: ["cluster.local/ns/default/sa/checkout-service"]`),
		[]byte(`principals: ["cluster.local/ns/default/sa/checkout-service", "cluster.local/ns/default/sa/badge-reader"]`), 1)
	if bytes.Equal(edited, data) {
		t.Fatal("the example policy no longer has the line this test edits")
	}
	if err := os.WriteFile(policy, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	trellis(t, dir, "status", "-f", m.file, "--wait", "--timeout", "20s")
	r = m.exec("default/badge-reader", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "http://orders-api.shipping/v1/orders")
	if r.stdout != "200" {
		t.Fatalf("POST from badge-reader after the edit = %q, want 200", r.stdout)
	}
	if out := trellis(t, dir, "logs", "-f", m.file, "shipping/orders-api"); !strings.Contains(out, "POST /v1/orders") {
		t.Errorf("trellis logs does not show nginx's access log:\n%s", out)
	}

	m.stop()
	if l := leftovers(t, prefix); len(l) > 0 {
		t.Fatalf("after Ctrl-C, still on the machine: %v", l)
	}

	// A crash leaves everything behind; the next up cleans it first and
	// keeps the CA.
	bundle, err := os.ReadFile(filepath.Join(dir, ".trellis", "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	m = startUp(t, dir)
	if err := m.up.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-m.up.exited
	if len(leftovers(t, prefix)) == 0 {
		t.Fatal("a killed trellis up left nothing behind; this test no longer tests cleanup")
	}
	// Its workloads and sidecars outlived it; the next up must stop them.
	m = startUp(t, dir)
	r = m.exec("default/checkout", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders")
	if r.err != nil {
		t.Fatalf("POST after a restart over leftovers: %v %s", r.err, r.stderr)
	}
	bundle2, err := os.ReadFile(filepath.Join(dir, ".trellis", "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bundle, bundle2) {
		t.Fatal("the CA changed across runs")
	}
	m.stop()
}

// TestUpPermissiveToStrict walks examples/permissive-to-strict: under
// PERMISSIVE a meshed client and a legacy one without sidecar both reach
// a stock Redis and HTTP server; the sidecars' metrics show the plaintext
// caller; after the switch to STRICT and `trellis status --wait`, the
// meshed client still works and the legacy one is refused, its open
// connection included.
func TestUpPermissiveToStrict(t *testing.T) {
	dir, _ := exampleCopy(t, "permissive-to-strict", "curl", "python3", "redis-server", "redis-cli", "mariadb", "mariadb-install-db")
	m := startUp(t, dir)
	t.Cleanup(m.stop)
	redis := func(workload string, args ...string) result {
		return m.exec(workload, append([]string{"redis-cli", "-h", "ledger.payments"}, args...)...)
	}
	if r := redis("default/api", "SET", "balance", "100"); strings.TrimSpace(r.stdout) != "OK" {
		t.Fatalf("meshed SET: %q %v %s", r.stdout, r.err, r.stderr)
	}
	if r := redis("default/batch-job", "GET", "balance"); strings.TrimSpace(r.stdout) != "100" {
		t.Fatalf("plaintext GET under PERMISSIVE: %q %v %s", r.stdout, r.err, r.stderr)
	}
	if r := m.exec("default/batch-job", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "http://web.payments/"); r.stdout != "200" {
		t.Fatalf("plaintext HTTP under PERMISSIVE = %q %s", r.stdout, r.stderr)
	}
	// MariaDB greets first: through both sidecars, without a stall.
	start := time.Now()
	if r := m.exec("default/api", "mariadb", "--no-defaults", "-h", "db.payments", "-u", "root", "-N", "-e", "select 6*7"); strings.TrimSpace(r.stdout) != "42" {
		t.Fatalf("MariaDB query through the mesh: %q %v %s", r.stdout, r.err, r.stderr)
	} else if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("the MariaDB query took %v: a server-first protocol stalled", took)
	}
	metrics := m.exec("payments/ledger", "curl", "-sS", "127.0.0.1:15000/metrics").stdout
	if !strings.Contains(metrics, `trellis_tcp_connections_total{decision="allow",destination="spiffe://cluster.local/ns/payments/sa/ledger",direction="inbound",policy="",source="unknown",tls="false"} 1`) ||
		!strings.Contains(metrics, `source="spiffe://cluster.local/ns/default/sa/api",tls="true"`) {
		t.Fatalf("the ledger's sidecar does not show one plaintext and one mTLS caller:\n%s", metrics)
	}

	// trellis edges shows the same: which callers STRICT would cut off.
	var edges []struct {
		Source, Destination, Plaintext string
		MTLS                           bool
		TCPConnectionsPerSecond        float64
	}
	if err := json.Unmarshal([]byte(trellis(t, dir, "edges", "-f", m.file, "-o", "json")), &edges); err != nil {
		t.Fatal(err)
	}
	var plain, secured bool
	for _, e := range edges {
		if e.Destination != "payments/ledger" || e.TCPConnectionsPerSecond == 0 {
			continue
		}
		plain = plain || e.Source == "(no sidecar)" && !e.MTLS && strings.Contains(e.Plaintext, "no sidecar")
		secured = secured || e.Source == "default/api" && e.MTLS
	}
	if !plain || !secured {
		t.Fatalf("trellis edges does not show the plaintext and the mTLS caller of the ledger: %+v", edges)
	}

	// A plaintext connection open across the switch is closed by it.
	held := exec.Command("ip", "netns", "exec", netnsOf(t, dir, "default/batch-job"), "redis-cli", "-h", "ledger.payments")
	stdin, err := held.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	heldOut := &lockedBuffer{}
	held.Stdout, held.Stderr = heldOut, heldOut
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = held.Process.Kill(); _ = held.Wait() })
	if _, err := stdin.Write([]byte("PING\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the held connection to answer", func() bool { return strings.Contains(heldOut.String(), "PONG") })

	policy := filepath.Join(dir, "policies", "payments.yaml")
	data, err := os.ReadFile(policy)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(policy, bytes.Replace(data, []byte("mode: PERMISSIVE"), []byte("mode: STRICT"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	trellis(t, dir, "status", "-f", m.file, "--wait", "--timeout", "20s")
	if r := redis("default/api", "GET", "balance"); strings.TrimSpace(r.stdout) != "100" {
		t.Fatalf("meshed GET under STRICT: %q %v %s", r.stdout, r.err, r.stderr)
	}
	if r := redis("default/batch-job", "GET", "balance"); strings.TrimSpace(r.stdout) == "100" {
		t.Fatal("plaintext GET succeeded under STRICT")
	}
	if r := m.exec("default/batch-job", "curl", "-sS", "-m", "5", "http://web.payments/"); r.err == nil {
		t.Fatalf("plaintext HTTP succeeded under STRICT: %q", r.stdout)
	}
	if _, err := stdin.Write([]byte("PING\n")); err == nil {
		waitFor(t, 10*time.Second, "the held plaintext connection to be closed", func() bool {
			out := heldOut.String()
			return strings.Count(out, "PONG") == 1 && strings.Contains(out, "Server closed the connection")
		})
	}
}

func netnsOf(t *testing.T, dir, workload string) string {
	t.Helper()
	st, err := localrun.ReadState(filepath.Join(dir, ".trellis"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range st.Replicas {
		if r.Workload == workload {
			return r.Netns
		}
	}
	t.Fatalf("no replica of %s", workload)
	return ""
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
