package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// newMeshDir creates a CA in a fresh directory and returns the directory.
func newMeshDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	trellis(t, dir, "ca", "init")
	return dir
}

func TestOpenSSLVerifiesIssuedChain(t *testing.T) {
	openssl := requireTool(t, "openssl")
	dir := newMeshDir(t)
	trellis(t, dir, "identity", "issue", "-n", "shipping", "--service-account", "orders-api", "--out", "orders")

	r := run(t, dir, "", openssl, "verify", "-CAfile", ".trellis/bundle.pem", "-untrusted", "orders/cert.pem", "orders/cert.pem")
	if r.err != nil || !strings.Contains(r.stdout, "OK") {
		t.Fatalf("openssl verify rejected our chain: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
	text := run(t, dir, "", openssl, "x509", "-in", "orders/cert.pem", "-noout", "-text").stdout
	for _, want := range []string{"URI:spiffe://cluster.local/ns/shipping/sa/orders-api", "CA:FALSE", "Digital Signature", "TLS Web Server Authentication, TLS Web Client Authentication"} {
		if !strings.Contains(text, want) {
			t.Errorf("certificate lacks %q:\n%s", want, text)
		}
	}

	foreign := newMeshDir(t)
	r = run(t, dir, "", openssl, "verify", "-CAfile", filepath.Join(foreign, ".trellis/bundle.pem"), "-untrusted", "orders/cert.pem", "orders/cert.pem")
	if r.err == nil {
		t.Fatalf("openssl verify accepted our chain against a foreign bundle:\n%s", r.stdout)
	}
}

// TestOpenSSLMutualTLS runs openssl s_server and s_client with two issued
// SVIDs: the handshake succeeds both ways, and fails for a client whose
// certificate comes from another CA.
func TestOpenSSLMutualTLS(t *testing.T) {
	openssl := requireTool(t, "openssl")
	dir := newMeshDir(t)
	trellis(t, dir, "identity", "issue", "-n", "shipping", "--service-account", "orders-api", "--out", "server")
	trellis(t, dir, "identity", "issue", "-n", "web", "--service-account", "frontend", "--out", "client")
	foreign := newMeshDir(t)
	trellis(t, foreign, "identity", "issue", "-n", "web", "--service-account", "frontend", "--out", "client")

	startServer := func() int {
		port := freePort(t)
		background(t, dir, "ACCEPT", openssl, "s_server",
			"-accept", fmt.Sprintf("127.0.0.1:%d", port), "-naccept", "1", "-www",
			"-cert", "server/cert.pem", "-key", "server/key.pem", "-cert_chain", "server/cert.pem",
			"-CAfile", ".trellis/bundle.pem", "-Verify", "1", "-verify_return_error")
		return port
	}
	client := func(port int, idDir string) result {
		return run(t, dir, "GET / HTTP/1.0\r\n\r\n", openssl, "s_client",
			"-connect", fmt.Sprintf("127.0.0.1:%d", port),
			"-cert", filepath.Join(idDir, "cert.pem"), "-key", filepath.Join(idDir, "key.pem"), "-cert_chain", filepath.Join(idDir, "cert.pem"),
			"-CAfile", ".trellis/bundle.pem", "-verify_return_error", "-ign_eof")
	}

	port := startServer()
	r := client(port, "client")
	if r.err != nil || !strings.Contains(r.stdout, "Verify return code: 0 (ok)") || !strings.Contains(r.stdout, "200 ok") {
		t.Fatalf("mutual TLS between two SVIDs failed: %v\n%s\n%s", r.err, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "Trellis intermediate CA") {
		t.Fatalf("server did not present its chain:\n%s", r.stdout)
	}

	port = startServer()
	r = client(port, filepath.Join(foreign, "client"))
	if strings.Contains(r.stdout, "200 ok") {
		t.Fatalf("server accepted a client certificate from another CA:\n%s", r.stdout)
	}
	if !strings.Contains(r.stdout+r.stderr, "alert") {
		t.Fatalf("handshake with a foreign client certificate did not end in a TLS alert:\n%s\n%s", r.stdout, r.stderr)
	}
}

// TestJoinTokenBootstrap runs the identity service and obtains an identity
// over the network with a single-use join token.
func TestJoinTokenBootstrap(t *testing.T) {
	openssl := requireTool(t, "openssl")
	dir := newMeshDir(t)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	background(t, dir, "listening on", trellisBin, "identity", "serve", "--listen", addr)

	token := strings.TrimSpace(trellis(t, dir, "token", "create", "-n", "shipping", "--service-account", "orders-api"))
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := trellis(t, dir, "identity", "request", "--server", addr, "-n", "shipping", "--service-account", "orders-api", "--token-file", "token", "--out", "orders")
	if !strings.Contains(out, "spiffe://cluster.local/ns/shipping/sa/orders-api") {
		t.Fatalf("unexpected output: %s", out)
	}
	r := run(t, dir, "", openssl, "verify", "-CAfile", ".trellis/bundle.pem", "-untrusted", "orders/cert.pem", "orders/cert.pem")
	if r.err != nil {
		t.Fatalf("openssl verify: %v\n%s%s", r.err, r.stdout, r.stderr)
	}

	// Single use: the same token is refused, and the message says why.
	stderr := trellisFails(t, dir, "identity", "request", "--server", addr, "-n", "shipping", "--service-account", "orders-api", "--token-file", "token", "--out", "again")
	if !strings.Contains(stderr, "Unauthenticated") {
		t.Fatalf("reused token: %s", stderr)
	}
	// A token for one identity cannot buy another.
	other := strings.TrimSpace(trellis(t, dir, "token", "create", "-n", "shipping", "--service-account", "orders-api"))
	stderr = trellisFails(t, dir, "identity", "request", "--server", addr, "-n", "shipping", "--service-account", "payments", "--token", other, "--out", "payments")
	if !strings.Contains(stderr, "authenticated as") {
		t.Fatalf("token for another identity: %s", stderr)
	}
}

func TestRootRotationWithTheCLI(t *testing.T) {
	openssl := requireTool(t, "openssl")
	dir := newMeshDir(t)
	trellis(t, dir, "identity", "issue", "-n", "shipping", "--service-account", "orders-api", "--out", "before")
	verify := func(idDir string) result {
		return run(t, dir, "", openssl, "verify", "-CAfile", ".trellis/bundle.pem", "-untrusted", idDir+"/cert.pem", idDir+"/cert.pem")
	}
	stderr := trellisFails(t, dir, "ca", "rotate-root", "activate")
	if !strings.Contains(stderr, "rotate-root prepare") {
		t.Fatalf("activate before prepare: %s", stderr)
	}
	trellis(t, dir, "ca", "rotate-root", "prepare")
	if r := verify("before"); r.err != nil {
		t.Fatalf("after prepare: %s%s", r.stdout, r.stderr)
	}
	stderr = trellisFails(t, dir, "ca", "rotate-root", "activate")
	if !strings.Contains(stderr, "--force") {
		t.Fatalf("activate while workloads may lack the new root: %s", stderr)
	}
	// The "before" workload keeps its old bundle file here; --force is
	// what an operator uses once every workload has renewed.
	trellis(t, dir, "ca", "rotate-root", "activate", "--force")
	trellis(t, dir, "identity", "issue", "-n", "shipping", "--service-account", "orders-api", "--out", "after")
	for _, d := range []string{"before", "after"} {
		if r := verify(d); r.err != nil {
			t.Fatalf("%s certificate after activate: %s%s", d, r.stdout, r.stderr)
		}
	}
	stderr = trellisFails(t, dir, "ca", "rotate-root", "retire")
	if !strings.Contains(stderr, "--force") {
		t.Fatalf("retire with live old-root certificates: %s", stderr)
	}
	trellis(t, dir, "ca", "rotate-root", "retire", "--force")
	if r := verify("after"); r.err != nil {
		t.Fatalf("new-root certificate after retire: %s%s", r.stdout, r.stderr)
	}
	if r := verify("before"); r.err == nil {
		t.Fatal("old-root certificate still verifies after retire")
	}
	if out := trellis(t, dir, "ca", "inspect"); strings.Count(out, "root ") != 1 {
		t.Fatalf("inspect after retire shows:\n%s", out)
	}
}

func TestCorruptStateIsAClearError(t *testing.T) {
	dir := newMeshDir(t)
	root := trellis(t, dir, "ca", "inspect", "-o", "json")
	if err := os.WriteFile(filepath.Join(dir, ".trellis/ca.json"), []byte("{ garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	stderr := trellisFails(t, dir, "identity", "issue", "--out", "x")
	if !strings.Contains(stderr, ".trellis/ca.json is corrupt") {
		t.Fatalf("corrupt state: %s", stderr)
	}
	stderr = trellisFails(t, dir, "ca", "init")
	if !strings.Contains(stderr, "already exists") {
		t.Fatalf("init over a corrupt state must refuse, got: %s", stderr)
	}
	_ = root
	stderr = trellisFails(t, t.TempDir(), "ca", "inspect")
	if !strings.Contains(stderr, "trellis ca init") {
		t.Fatalf("missing state: %s", stderr)
	}
}
