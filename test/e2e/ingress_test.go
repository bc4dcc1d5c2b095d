package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestIngressExample runs examples/ingress (process isolation, so without
// root): curl from the host over HTTPS to the gateway, which terminates
// TLS with the shop's certificate, reaches orders-api over mTLS with the
// gateway's identity — the only one orders-api admits — while a meshed
// workload calling orders-api directly is denied; the edges show the hop
// gateway → app as mTLS.
func TestIngressExample(t *testing.T) {
	for _, tool := range []string{"curl", "python3", "openssl", "setpriv"} {
		requireTool(t, tool)
	}
	m := newNoRootMesh(t, "ingress")
	if err := os.RemoveAll(filepath.Join(m.dir, "certs")); err != nil {
		t.Fatal(err)
	}
	if r := m.run("bash", filepath.Join(m.dir, "make-certs")); r.err != nil {
		t.Fatalf("make-certs: %v %s", r.err, r.stderr)
	}
	m.start()

	ca := filepath.Join(m.dir, "certs", "shop-ca.pem")
	r := run(t, m.dir, "", "curl", "-sS", "-m", "10", "--cacert", ca, "--resolve", "shop.example.test:18443:127.0.0.1", "https://shop.example.test:18443/")
	if r.err != nil || !strings.Contains(r.stdout, "orders-api, behind the gateway") {
		t.Fatalf("HTTPS through the gateway: %v %q %s", r.err, r.stdout, r.stderr)
	}
	if r := run(t, m.dir, "", "curl", "-sS", "-m", "10", "-H", "Host: elsewhere.example.test", "http://127.0.0.1:18480/"); !strings.Contains(r.stdout, "no HTTPRoute") {
		t.Fatalf("a host no route serves: %q %s", r.stdout, r.stderr)
	}
	if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "http://orders-api.shipping/"); r.stdout != "403" {
		t.Fatalf("checkout calling orders-api directly = %q, want 403: only the gateway is admitted", r.stdout)
	}
	edges := m.trellis("edges", "-f", m.file)
	if !regexp.MustCompile(`edge/ingress\s+shipping/orders-api\s+yes`).MatchString(edges) {
		t.Fatalf("trellis edges does not show gateway → orders-api over mTLS:\n%s", edges)
	}
	m.down()
}
