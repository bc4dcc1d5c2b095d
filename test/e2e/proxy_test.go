package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// mesh is a CA with workload identities, and the sidecars of a test.
type mesh struct {
	t   *testing.T
	dir string
}

func newMesh(t *testing.T) *mesh {
	return &mesh{t: t, dir: newMeshDir(t)}
}

// identity issues ns/sa's SVID into a directory and returns it.
func (m *mesh) identity(ns, sa string) string {
	out := filepath.Join(m.dir, "id-"+ns+"-"+sa)
	trellis(m.t, m.dir, "identity", "issue", "-n", ns, "--service-account", sa, "--out", out)
	return out
}

// sidecar starts trellis-proxy with idDir's identity and config, waits
// until it is ready, and returns its admin address.
func (m *mesh) sidecar(name, idDir, config string) string {
	m.t.Helper()
	cfgPath := filepath.Join(m.dir, name+".yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		m.t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(m.t))
	background(m.t, m.dir, "admin endpoints listening", proxyBin, "--static", idDir, "--config", cfgPath, "--admin-addr", admin)
	waitFor(m.t, 10*time.Second, name+" ready", func() bool { return httpGet(m.t, "http://"+admin+"/ready") == http.StatusOK })
	return admin
}

// policies writes a policy directory and returns its path.
func (m *mesh) policies(files map[string]string) string {
	dir := filepath.Join(m.dir, "policies")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		m.t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			m.t.Fatal(err)
		}
	}
	return dir
}

// backend serves HTTP on loopback, answering with the method and path.
func backend(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "orders-api saw %s %s\n", r.Method, r.URL.Path)
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}

func serverConfig(inPort, appPort int, protocol, policies string) string {
	cfg := fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: shipping, name: orders-api, labels: {app: orders-api}}
inbound:
  - {listen: "127.0.0.1:%d", appPort: %d, protocol: %q}
`, inPort, appPort, protocol)
	if policies != "" {
		cfg += "policies: " + policies + "\n"
	}
	return cfg
}

func clientConfig(outPort, inPort int, protocol, identity string) string {
	return fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: default, name: checkout}
outbound:
  - listen: "127.0.0.1:%d"
    service: orders-api.shipping
    protocol: %q
    endpoints:
      - {address: "127.0.0.1:%d", identity: %q}
`, outPort, protocol, inPort, identity)
}

const ordersID = "spiffe://cluster.local/ns/shipping/sa/orders-api"

// The seed scenario: checkout may POST /v1/orders; shipping is STRICT.
var seedPolicies = map[string]string{
	"strict.yaml": `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: shipping}
spec:
  mtls: {mode: STRICT}
`,
	"allow.yaml": `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-checkout-to-orders, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/checkout-service"]}
    to:
    - operation: {methods: ["POST"], paths: ["/v1/orders"]}
`,
}

type curlResult struct {
	code    string
	headers string
	body    string
	err     error
}

func curl(t *testing.T, args ...string) curlResult {
	t.Helper()
	requireTool(t, "curl")
	hdr := filepath.Join(t.TempDir(), "headers")
	r := run(t, "", "", "curl", append([]string{"-sS", "--max-time", "10", "-D", hdr, "-w", "\n%{http_code}"}, args...)...)
	h, _ := os.ReadFile(hdr)
	out := strings.TrimRight(r.stdout, "\n")
	i := strings.LastIndex(out, "\n")
	res := curlResult{headers: string(h), err: r.err}
	if i >= 0 {
		res.body, res.code = out[:i], out[i+1:]
	} else {
		res.code = out
	}
	return res
}

// TestMeshHTTPAndAuthorization runs the seed scenario through two real
// sidecars: the caller's request crosses mutual TLS, authorization allows
// POST /v1/orders and denies the rest with 403 naming the policy, and the
// STRICT port refuses plaintext.
func TestMeshHTTPAndAuthorization(t *testing.T) {
	m := newMesh(t)
	app := backend(t)
	inPort, outPort := freePort(t), freePort(t)
	pol := m.policies(seedPolicies)
	serverAdmin := m.sidecar("orders", m.identity("shipping", "orders-api"), serverConfig(inPort, app, "http", pol))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "http", ordersID))

	r := curl(t, "-X", "POST", fmt.Sprintf("http://127.0.0.1:%d/v1/orders", outPort))
	if r.code != "200" || !strings.Contains(r.body, "orders-api saw POST /v1/orders") {
		t.Fatalf("allowed request: %+v", r)
	}
	r = curl(t, fmt.Sprintf("http://127.0.0.1:%d/v1/orders", outPort))
	if r.code != "403" || !strings.Contains(strings.ToLower(r.headers), "x-trellis-denied-by: no matching allow policy") {
		t.Fatalf("GET must be denied with the reason in a header: %+v", r)
	}
	// Plaintext straight to the STRICT inbound port is refused before the app.
	r = curl(t, fmt.Sprintf("http://127.0.0.1:%d/v1/orders", inPort))
	if r.err == nil {
		t.Fatalf("plaintext request to a STRICT port got an answer: %+v", r)
	}

	metrics := httpBody(t, "http://"+serverAdmin+"/metrics")
	for _, want := range []string{
		`decision="allow",destination="spiffe://cluster.local/ns/shipping/sa/orders-api",direction="inbound",policy="shipping/allow-checkout-to-orders",source="spiffe://cluster.local/ns/default/sa/checkout-service",status_class="2xx",tls="true"`,
		`decision="deny",destination="spiffe://cluster.local/ns/shipping/sa/orders-api",direction="inbound",policy="",source="spiffe://cluster.local/ns/default/sa/checkout-service",status_class="4xx",tls="true"`,
		`trellis_refused_connections_total{direction="inbound",reason="plaintext on a STRICT port"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// TestPolicyEditTakesEffect changes the policy directory under a running
// sidecar: a valid edit applies, an invalid one is refused and the previous
// policies stay in force.
func TestPolicyEditTakesEffect(t *testing.T) {
	m := newMesh(t)
	app := backend(t)
	inPort, outPort := freePort(t), freePort(t)
	pol := m.policies(seedPolicies)
	m.sidecar("orders", m.identity("shipping", "orders-api"), serverConfig(inPort, app, "http", pol))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "http", ordersID))
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/orders", outPort)
	if r := curl(t, url); r.code != "403" {
		t.Fatalf("before the edit: %+v", r)
	}
	allowGet := strings.Replace(seedPolicies["allow.yaml"], `methods: ["POST"]`, `methods: ["POST", "GET"]`, 1)
	if err := os.WriteFile(filepath.Join(pol, "allow.yaml"), []byte(allowGet), 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "the edited policy to allow GET", func() bool { return curl(t, url).code == "200" })

	if err := os.WriteFile(filepath.Join(pol, "broken.yaml"), []byte("kind: AuthorizationPolicy\nspec: {action: MAYBE}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The broken file is refused; GET stays allowed under the last good set.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if r := curl(t, url); r.code != "200" {
			t.Fatalf("an invalid policy file changed enforcement: %+v", r)
		}
		time.Sleep(200 * time.Millisecond) // sample over several reload periods
	}
}

// TestSecureNaming points the caller at an endpoint that proves a different
// identity than the destination should have: the request fails with 502.
func TestSecureNaming(t *testing.T) {
	m := newMesh(t)
	app := backend(t)
	inPort, outPort := freePort(t), freePort(t)
	m.sidecar("impostor", m.identity("shipping", "payments"), serverConfig(inPort, app, "http", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "http", ordersID))
	r := curl(t, fmt.Sprintf("http://127.0.0.1:%d/v1/orders", outPort))
	if r.code != "502" || !strings.Contains(r.body, "did not prove the expected identity") {
		t.Fatalf("request to an endpoint with the wrong identity: %+v", r)
	}
}

// TestBackendDown answers 503 with a body that says what failed.
func TestBackendDown(t *testing.T) {
	m := newMesh(t)
	inPort, outPort, dead := freePort(t), freePort(t), freePort(t)
	m.sidecar("orders", m.identity("shipping", "orders-api"), serverConfig(inPort, dead, "http", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "http", ordersID))
	r := curl(t, fmt.Sprintf("http://127.0.0.1:%d/", outPort))
	if r.code != "503" || !strings.Contains(r.body, "connection refused") {
		t.Fatalf("backend down: %+v", r)
	}
}

// TestForeignCertificateRefused presents a client certificate from another
// CA to the inbound port, with the mesh ALPN: the handshake fails.
func TestForeignCertificateRefused(t *testing.T) {
	openssl := requireTool(t, "openssl")
	m := newMesh(t)
	app := backend(t)
	inPort := freePort(t)
	m.sidecar("orders", m.identity("shipping", "orders-api"), serverConfig(inPort, app, "tcp", ""))
	foreign := newMesh(t)
	stranger := foreign.identity("default", "checkout-service")
	legit := m.identity("default", "checkout-service")
	connect := func(idDir, bundle string) result {
		return run(t, m.dir, "GET / HTTP/1.0\r\n\r\n", openssl, "s_client", "-connect", fmt.Sprintf("127.0.0.1:%d", inPort),
			"-alpn", "trellis-tcp", "-cert", idDir+"/cert.pem", "-key", idDir+"/key.pem", "-cert_chain", idDir+"/cert.pem",
			"-CAfile", bundle, "-verify_return_error", "-ign_eof")
	}
	if r := connect(legit, m.dir+"/.trellis/bundle.pem"); !strings.Contains(r.stdout, "orders-api saw GET /") {
		t.Fatalf("a mesh client over openssl did not reach the app:\n%s\n%s", r.stdout, r.stderr)
	}
	if r := connect(stranger, m.dir+"/.trellis/bundle.pem"); strings.Contains(r.stdout, "orders-api saw") {
		t.Fatalf("a client certificate from another CA reached the app:\n%s", r.stdout)
	}
}

// TestRedisThroughTheMesh relays Redis (opaque TCP) through both sidecars.
func TestRedisThroughTheMesh(t *testing.T) {
	redisServer := requireTool(t, "redis-server")
	redisCLI := requireTool(t, "redis-cli")
	m := newMesh(t)
	redisPort, inPort, outPort := freePort(t), freePort(t), freePort(t)
	background(t, m.dir, "Ready to accept connections", redisServer, "--port", fmt.Sprint(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	m.sidecar("redis", m.identity("shipping", "orders-api"), serverConfig(inPort, redisPort, "tcp", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "tcp", ordersID))
	cli := func(args ...string) string {
		r := run(t, m.dir, "", redisCLI, append([]string{"-h", "127.0.0.1", "-p", fmt.Sprint(outPort)}, args...)...)
		if r.err != nil {
			t.Fatalf("redis-cli %v: %v %s", args, r.err, r.stderr)
		}
		return strings.TrimSpace(r.stdout)
	}
	if got := cli("SET", "order:1", "shipped"); got != "OK" {
		t.Fatalf("SET = %q", got)
	}
	if got := cli("GET", "order:1"); got != "shipped" {
		t.Fatalf("GET = %q", got)
	}
}

// TestServerFirstProtocol relays a protocol whose server speaks first (as
// MySQL does) on a port declared server-first, without waiting for the client.
func TestServerFirstProtocol(t *testing.T) {
	m := newMesh(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "220 greeting from the server\r\n")
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "250 you said %s", line)
			}()
		}
	}()
	inPort, outPort := freePort(t), freePort(t)
	m.sidecar("db", m.identity("shipping", "orders-api"), serverConfig(inPort, l.Addr().(*net.TCPAddr).Port, "server-first", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "server-first", ordersID))

	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", outPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	br := bufio.NewReader(c)
	greeting, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(greeting, "220 greeting") {
		t.Fatalf("greeting %q, %v", greeting, err)
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("the greeting took %v: the proxy stalled a server-first protocol", waited)
	}
	fmt.Fprintf(c, "HELO\r\n")
	if reply, err := br.ReadString('\n'); err != nil || reply != "250 you said HELO\r\n" {
		t.Fatalf("reply %q, %v", reply, err)
	}
}

// TestMariaDBThroughTheMesh runs a real MariaDB server, whose protocol has
// the server speak first, behind a sidecar: through the mesh, and as a
// plaintext client on the PERMISSIVE port, neither stalls.
func TestMariaDBThroughTheMesh(t *testing.T) {
	mariadbd := "/usr/sbin/mariadbd"
	if _, err := os.Stat(mariadbd); err != nil {
		mariadbd = requireTool(t, "mariadbd")
	}
	installDB := requireTool(t, "mariadb-install-db")
	client := requireTool(t, "mariadb")
	m := newMesh(t)
	data := filepath.Join(t.TempDir(), "data")
	if r := run(t, m.dir, "", installDB, "--no-defaults", "--datadir="+data, "--auth-root-authentication-method=normal", "--skip-test-db", "--user=root"); r.err != nil {
		t.Fatalf("mariadb-install-db: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
	dbPort, inPort, outPort := freePort(t), freePort(t), freePort(t)
	background(t, m.dir, "ready for connections", mariadbd, "--no-defaults", "--datadir="+data, "--port="+fmt.Sprint(dbPort),
		"--bind-address=127.0.0.1", "--socket="+filepath.Join(data, "sock"), "--user=root", "--skip-grant-tables")
	m.sidecar("db", m.identity("shipping", "orders-db"), serverConfig(inPort, dbPort, "server-first", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "server-first", "spiffe://cluster.local/ns/shipping/sa/orders-db"))
	for _, port := range []int{outPort, inPort} {
		start := time.Now()
		r := run(t, m.dir, "", client, "--no-defaults", "-h", "127.0.0.1", "-P", fmt.Sprint(port), "-u", "root", "-N", "-e", "select 6*7")
		if r.err != nil || strings.TrimSpace(r.stdout) != "42" {
			t.Fatalf("query via port %d: %v %q %s", port, r.err, r.stdout, r.stderr)
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("query via port %d took %v: the proxy stalled a server-first protocol", port, took)
		}
	}
}

// TestGRPCStreamingThroughTheMesh calls a gRPC server (unary and
// server-streaming) through both sidecars with h2c on the application side.
func TestGRPCStreamingThroughTheMesh(t *testing.T) {
	m := newMesh(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	go func() { _ = g.Serve(l) }()
	defer g.Stop()
	inPort, outPort := freePort(t), freePort(t)
	m.sidecar("grpc", m.identity("shipping", "orders-api"), serverConfig(inPort, l.Addr().(*net.TCPAddr).Port, "grpc", ""))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "grpc", ordersID))

	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", outPort), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := healthpb.NewHealthClient(conn)
	resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("unary call through the mesh: %v, %v", resp, err)
	}
	stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: "orders"})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || first.Status != healthpb.HealthCheckResponse_SERVICE_UNKNOWN {
		t.Fatalf("first streamed message: %v, %v", first, err)
	}
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	second, err := stream.Recv()
	if err != nil || second.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("second streamed message: %v, %v", second, err)
	}
}

// TestGarbageAndSilenceDoNotHurtOthers sends garbage and half-open
// connections to a STRICT inbound port; legitimate traffic keeps flowing.
func TestGarbageAndSilenceDoNotHurtOthers(t *testing.T) {
	m := newMesh(t)
	app := backend(t)
	inPort, outPort := freePort(t), freePort(t)
	pol := m.policies(map[string]string{"strict.yaml": seedPolicies["strict.yaml"]})
	m.sidecar("orders", m.identity("shipping", "orders-api"), serverConfig(inPort, app, "http", pol))
	m.sidecar("checkout", m.identity("default", "checkout-service"), clientConfig(outPort, inPort, "http", ordersID))
	var idle []net.Conn
	for range 50 {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", inPort))
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c) // says nothing: slow-loris
	}
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	garbage, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", inPort))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = garbage.Write([]byte("\x16\x03\x01\xff\xffnot a client hello at all"))
	_ = garbage.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(garbage); err != nil {
		t.Fatalf("garbage connection was not closed by the proxy: %v", err)
	}
	if r := curl(t, fmt.Sprintf("http://127.0.0.1:%d/", outPort)); r.code != "200" {
		t.Fatalf("legitimate request while under garbage: %+v", r)
	}
}

// TestAdminConfigAndShutdown reads /config (identity, expiry, policy
// version) and stops the sidecar with POST /shutdown, as a Job would.
func TestAdminConfigAndShutdown(t *testing.T) {
	m := newMesh(t)
	app := backend(t)
	inPort := freePort(t)
	pol := m.policies(seedPolicies)
	cfgPath := filepath.Join(m.dir, "orders.yaml")
	if err := os.WriteFile(cfgPath, []byte(serverConfig(inPort, app, "http", pol)), 0o600); err != nil {
		t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := background(t, m.dir, "admin endpoints listening", proxyBin, "--static", m.identity("shipping", "orders-api"), "--config", cfgPath, "--admin-addr", admin)
	waitFor(t, 10*time.Second, "ready", func() bool { return httpGet(t, "http://"+admin+"/ready") == http.StatusOK })
	cfg := httpBody(t, "http://"+admin+"/config")
	for _, want := range []string{`"spiffeId": "spiffe://cluster.local/ns/shipping/sa/orders-api"`, `"notAfter"`, `"policyVersion"`, `"appPort": 8080`} {
		if want == `"appPort": 8080` {
			want = fmt.Sprintf(`"appPort": %d`, app)
		}
		if !strings.Contains(cfg, want) {
			t.Errorf("/config lacks %s:\n%s", want, cfg)
		}
	}
	resp, err := http.Post("http://"+admin+"/shutdown", "text/plain", nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /shutdown: %v %v", resp, err)
	}
	resp.Body.Close()
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("the sidecar did not exit after POST /shutdown")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d after a graceful shutdown", code)
	}
}

func httpBody(t *testing.T, url string) string {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
