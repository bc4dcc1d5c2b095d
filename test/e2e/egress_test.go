package e2e

import (
	"github.com/trellis-mesh/trellis/internal/localrun"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEgressExample runs examples/egress (process isolation, so without
// root): the shop's plain `curl http://partner.example.test/` reaches the
// partner's nginx, which requires a client certificate from its own CA,
// through the mutual TLS the shop's sidecar originates. Without the
// DestinationRule it fails; a client certificate from another CA nginx
// does not accept is a 502 naming the CA it does; a key that is not the
// certificate's is a 502 saying so, and status warns; a destination
// outside the registry is refused (REGISTRY_ONLY).
func TestEgressExample(t *testing.T) {
	for _, tool := range []string{"curl", "python3", "nginx", "openssl", "setpriv"} {
		requireTool(t, tool)
	}
	m := newNoRootMesh(t, "egress")
	// The partner's PKI is made for the test (a checkout has none).
	if err := os.RemoveAll(filepath.Join(m.dir, "certs")); err != nil {
		t.Fatal(err)
	}
	if r := m.run("bash", filepath.Join(m.dir, "make-certs")); r.err != nil {
		t.Fatalf("make-certs: %v %s", r.err, r.stderr)
	}
	m.start()

	curl := func(url string) result {
		t.Helper()
		return m.sh("default/shop", `curl -sS -m 10 -x "$HTTP_PROXY" `+url)
	}
	if r := curl("http://partner.example.test/orders"); r.err != nil || !strings.Contains(r.stdout, "partner: hello CN=shop,O=Shop") {
		t.Fatalf("the shop through its sidecar's mTLS: %v %q %s", r.err, r.stdout, r.stderr)
	}
	if r := curl("http://elsewhere.example.test/"); !strings.Contains(r.stdout, "REGISTRY_ONLY") {
		t.Fatalf("a host outside the registry: %q", r.stdout)
	}
	edges := m.trellis("edges", "-f", m.file)
	if !strings.Contains(edges, "partner.example.test (outside the mesh)") {
		t.Fatalf("trellis edges does not show the egress:\n%s", edges)
	}

	tlsFile := filepath.Join(m.dir, "policies", "partner-tls.yaml")
	original, err := os.ReadFile(tlsFile)
	if err != nil {
		t.Fatal(err)
	}
	setTLS := func(content string) {
		t.Helper()
		if content == "" {
			if err := os.Remove(tlsFile); err != nil {
				t.Fatal(err)
			}
		} else {
			tmp := filepath.Join(m.dir, "partner-tls.tmp")
			if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, tlsFile); err != nil {
				t.Fatal(err)
			}
		}
		m.trellis("status", "-f", m.file, "--wait", "--timeout", "20s")
	}

	// Without the DestinationRule the sidecar speaks plain HTTP to the
	// HTTPS port: nothing gets through.
	setTLS("")
	if r := curl("http://partner.example.test/"); strings.Contains(r.stdout, "partner: hello") || !strings.Contains(r.stdout, "plain HTTP request was sent to HTTPS port") {
		t.Fatalf("without the DestinationRule: %q, want nginx refusing plain HTTP", r.stdout)
	}
	// A client certificate from another CA: nginx names the CA it
	// accepts, and the shop gets a 502 that says so.
	setTLS(strings.NewReplacer("shop-client.pem", "rogue-client.pem", "shop-client.key", "rogue-client.key").Replace(string(original)))
	if r := curl("http://partner.example.test/"); strings.Contains(r.stdout, "partner: hello") || !strings.Contains(r.stdout, "it accepts certificates from CN=Partner CA,O=Partner") {
		t.Fatalf("with the rogue certificate: %q", r.stdout)
	}
	// A key that is not the certificate's: the sidecar says so, in the 502
	// and in status.
	setTLS(strings.Replace(string(original), "shop-client.key", "rogue-client.key", 1))
	if r := m.sh("default/shop", `curl -sS -m 10 -o /dev/null -w '%{http_code}' -x "$HTTP_PROXY" http://partner.example.test/`); r.stdout != "502" {
		t.Fatalf("with a mismatched key: status %q", r.stdout)
	}
	if r := curl("http://partner.example.test/"); !strings.Contains(r.stdout, "private key does not match public key") {
		t.Fatalf("the 502 does not say why: %q", r.stdout)
	}
	if status := m.trellis("status", "-f", m.file); !strings.Contains(status, "does not match") {
		t.Fatalf("trellis status does not warn of the mismatched key:\n%s", status)
	}
	// Back as it was: through again, without a restart.
	setTLS(string(original))
	waitFor(t, 10*time.Second, "the partner to answer again", func() bool {
		return strings.Contains(curl("http://partner.example.test/").stdout, "partner: hello CN=shop")
	})
	m.down()
}

// TestEgressNetns runs the egress example under netns isolation (root):
// the shop resolves partner.example.test, through its namespace's hosts
// file, to a virtual IP its sidecar intercepts and routes to the partner
// with the mutual TLS the DestinationRule asks for — no HTTP proxy. The
// partner runs in a namespace of its own; its ServiceEntry is written once
// its address is known, so the hosts files follow resources put in force
// while the mesh runs.
func TestEgressNetns(t *testing.T) {
	dir, _ := exampleCopy(t, "egress", "curl", "python3", "nginx", "openssl")
	for name, edit := range map[string][2]string{
		"mesh.yaml":             {"isolation: process", "isolation: netns"},
		"partner/nginx.conf":    {"listen 127.0.0.1:18443 ssl;", "listen 18443 ssl;"},
		"policies/partner.yaml": {"address: 127.0.0.1", "address: PARTNER"},
	} {
		path := filepath.Join(dir, name)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if edit[0] != "" && !strings.Contains(string(data), edit[0]) {
			t.Fatalf("%s no longer has %q", name, edit[0])
		}
		if err := os.WriteFile(path, []byte(strings.Replace(string(data), edit[0], edit[1], 1)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The ServiceEntry (and its DestinationRule) wait for the partner's
	// address.
	entry := filepath.Join(dir, "policies", "partner.yaml")
	held := filepath.Join(dir, "partner.yaml.held")
	rule := filepath.Join(dir, "policies", "partner-tls.yaml")
	heldRule := filepath.Join(dir, "partner-tls.yaml.held")
	for _, f := range [][2]string{{entry, held}, {rule, heldRule}} {
		if err := os.Rename(f[0], f[1]); err != nil {
			t.Fatal(err)
		}
	}
	if r := run(t, dir, "", "bash", filepath.Join(dir, "make-certs")); r.err != nil {
		t.Fatalf("make-certs: %v %s", r.err, r.stderr)
	}
	// The programs' users must read the partner's server key.
	if err := filepath.WalkDir(filepath.Join(dir, "certs"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if d.IsDir() {
			mode = 0o755
		}
		return os.Chmod(p, mode)
	}); err != nil {
		t.Fatal(err)
	}
	m := startUp(t, dir)
	t.Cleanup(m.stop)

	st, err := localrun.ReadState(filepath.Join(dir, ".trellis"))
	if err != nil {
		t.Fatal(err)
	}
	partner := ""
	for _, r := range st.Replicas {
		if r.Workload == "external/partner" {
			partner = r.Address
		}
	}
	data, err := os.ReadFile(held)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(held, []byte(strings.Replace(string(data), "PARTNER", partner, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	// The entry first: the rule alone would be rejected.
	if err := os.Rename(held, entry); err != nil {
		t.Fatal(err)
	}
	trellis(t, dir, "status", "-f", m.file, "--wait", "--timeout", "20s")
	if err := os.Rename(heldRule, rule); err != nil {
		t.Fatal(err)
	}
	trellis(t, dir, "status", "-f", m.file, "--wait", "--timeout", "20s")
	waitFor(t, 20*time.Second, "the shop to reach the partner", func() bool {
		r := m.exec("default/shop", "curl", "-sS", "-m", "5", "http://partner.example.test/")
		return strings.Contains(r.stdout, "partner: hello CN=shop,O=Shop")
	})
	// REGISTRY_ONLY: the partner's own address is not in the registry;
	// the sidecar refuses and counts it.
	if r := m.exec("default/shop", "curl", "-sS", "-m", "5", "http://"+partner+":18443/"); r.err == nil {
		t.Fatalf("a destination outside the registry was reached: %q", r.stdout)
	}
	metrics := m.exec("default/shop", "curl", "-sS", "127.0.0.1:15000/metrics").stdout
	if !strings.Contains(metrics, `trellis_refused_connections_total{direction="outbound",reason="not in the registry (REGISTRY_ONLY)"} 1`) {
		t.Fatalf("the refusal is not counted:\n%s", metrics)
	}
}
