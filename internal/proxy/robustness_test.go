package proxy

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// echoServer accepts TCP connections and echoes them.
func echoServer(t *testing.T) uint32 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return uint32(l.Addr().(*net.TCPAddr).Port)
}

// tcpSidecar runs a proxy with one TCP inbound port in front of an echo
// server and returns its address.
func tcpSidecar(t *testing.T, iss *issuer) string {
	t.Helper()
	in := freeAddr(t)
	startProxy(t, ordersConfig(in, echoServer(t), config.ProtocolTCP), iss.holderFor(ordersID))
	return in
}

// svidAt issues an SVID from a CA whose clock reads at, with the minimum
// lifetime; at in the past gives an expired certificate.
func svidAt(t *testing.T, td, id string, at time.Time) *identity.SVID {
	t.Helper()
	authority, err := ca.Init(ca.Config{StateDir: t.TempDir(), Now: func() time.Time { return at }}, ca.InitOptions{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	return signSVID(t, authority, id, at)
}

// meshDial connects like a peer proxy would, presenting cert.
func meshDial(addr string, cert *tls.Certificate) error {
	cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ALPNTCP}, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	// In TLS 1.3 the server's verdict on the client certificate arrives
	// after the handshake: the echo round trip shows it.
	return pingPong(c)
}

// TestBadClientCertificatesAreRefused covers the certificates a peer must
// not get in with; a valid one still works after each.
func TestBadClientCertificatesAreRefused(t *testing.T) {
	iss := newIssuer(t)
	addr := tcpSidecar(t, iss)
	good := iss.svid("spiffe://cluster.local/ns/default/sa/checkout")
	for _, tc := range []struct {
		name string
		cert *tls.Certificate
	}{
		{"no certificate", nil},
		{"foreign CA", svidAt(t, "cluster.local", "spiffe://cluster.local/ns/default/sa/checkout", time.Now()).TLSCertificate()},
		{"other trust domain", svidAt(t, "evil.example", "spiffe://evil.example/ns/default/sa/checkout", time.Now()).TLSCertificate()},
		{"expired", expiredFrom(t, iss)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := meshDial(addr, tc.cert); err == nil {
				t.Fatal("the connection reached the application")
			}
			if err := meshDial(addr, good.TLSCertificate()); err != nil {
				t.Fatalf("a valid peer after the refusal: %v", err)
			}
		})
	}
}

// expiredFrom signs, with the issuer's own CA, a certificate whose validity
// ended before now: the CA is loaded again with its clock set in the past.
func expiredFrom(t *testing.T, iss *issuer) *tls.Certificate {
	t.Helper()
	dir := iss.dir
	past := time.Now().Add(-time.Hour)
	old, err := ca.Load(ca.Config{StateDir: dir, Now: func() time.Time { return past }})
	if err != nil {
		t.Fatal(err)
	}
	s := signSVID(t, old, "spiffe://cluster.local/ns/default/sa/checkout", past)
	if !s.NotAfter().Before(time.Now()) {
		t.Fatalf("certificate not expired: %v", s.NotAfter())
	}
	return s.TLSCertificate()
}

// TestOversizedHeadersAreRefused sends a request with 100 KB of headers
// (431) and malformed ones (400, including two differing Content-Lengths);
// the proxy keeps serving. (Transfer-Encoding with Content-Length is framed
// by Transfer-Encoding as RFC 9112 says, and the proxy re-frames every
// request it forwards, so no smuggled request reaches the application.)
func TestOversizedHeadersAreRefused(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	in := freeAddr(t)
	startProxy(t, ordersConfig(in, app, config.ProtocolHTTP), iss.holderFor(ordersID))
	req, _ := http.NewRequest("GET", "http://"+in+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 100<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("status %d, want 431", resp.StatusCode)
	}
	// Malformed framing gets 400 from the proxy, never reaching the app.
	for _, raw := range []string{
		"GET / HTTP/1.1\r\nHost: orders\r\nno colon here\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
	} {
		c, err := net.DialTimeout("tcp", in, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, raw)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err != nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("malformed request %q: %v %v, want 400", raw, resp, err)
		}
	}
	resp, err = http.Get("http://" + in + "/")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("normal request afterwards: %v %v", resp, err)
	}
	resp.Body.Close()
}

// TestWebSocketUpgradeThroughTheMesh upgrades an HTTP/1.1 connection
// through both sidecars and exchanges bytes both ways on it.
func TestWebSocketUpgradeThroughTheMesh(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "upgrade required", http.StatusUpgradeRequired)
			return
		}
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		_ = rw.Flush()
		line, _ := rw.ReadString('\n')
		_, _ = rw.WriteString("echo: " + line)
		_ = rw.Flush()
	}))
	in, out := freeAddr(t), freeAddr(t)
	startProxy(t, ordersConfig(in, app, config.ProtocolHTTP), iss.holderFor(ordersID))
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}), iss.holderFor("spiffe://cluster.local/ns/default/sa/checkout"))

	c, err := net.DialTimeout("tcp", out, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: orders-api\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	_, _ = io.WriteString(c, "hello over the upgraded connection\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "echo: hello over the upgraded connection\n" {
		t.Fatalf("after the upgrade: %q, %v", line, err)
	}
}

// TestFailoverToAReachableEndpoint lists a dead endpoint first: every
// HTTP request and TCP stream still succeeds on the live one.
func TestFailoverToAReachableEndpoint(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	httpIn, tcpIn, dead := freeAddr(t), freeAddr(t), freeAddr(t)
	serverCfg := ordersConfig(httpIn, app, config.ProtocolHTTP)
	serverCfg.Inbound = append(serverCfg.Inbound, config.Inbound{Listen: tcpIn, AppPort: echoServer(t), Protocol: config.ProtocolTCP})
	startProxy(t, serverCfg, iss.holderFor(ordersID))
	httpOut, tcpOut := freeAddr(t), freeAddr(t)
	deadFirst := func(live string) []config.Endpoint {
		return []config.Endpoint{{Address: dead, Identity: ordersID}, {Address: live, Identity: ordersID}}
	}
	startProxy(t, checkoutConfig(config.Outbound{Listen: httpOut, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: deadFirst(httpIn)},
		config.Outbound{Listen: tcpOut, Service: "echo.shipping", Protocol: config.ProtocolTCP, Endpoints: deadFirst(tcpIn)}), iss.holderFor("spiffe://cluster.local/ns/default/sa/checkout"))
	for i := range 6 {
		resp, err := http.Get("http://" + httpOut + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
		if err := meshEcho(tcpOut); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
}

// meshEcho sends a line through a plaintext connection to addr and expects
// it back.
func meshEcho(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return pingPong(c)
}

// pingPong sends a line on c and expects the echo server behind it to send
// it back.
func pingPong(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "ping\n" {
		return fmt.Errorf("echo %q, %v", line, err)
	}
	return nil
}

// TestFailoverKeepsRequestBodies posts bodies through a route whose first
// endpoint is dead: each body arrives whole at the live one.
func TestFailoverKeepsRequestBodies(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	}))
	in, out, dead := freeAddr(t), freeAddr(t), freeAddr(t)
	startProxy(t, ordersConfig(in, app, config.ProtocolHTTP), iss.holderFor(ordersID))
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
		Endpoints: []config.Endpoint{{Address: dead, Identity: ordersID}, {Address: in, Identity: ordersID}}}), iss.holderFor("spiffe://cluster.local/ns/default/sa/checkout"))
	for i := range 4 {
		want := fmt.Sprintf("order %d: two widgets", i)
		resp, err := http.Post("http://"+out+"/v1/orders", "text/plain", strings.NewReader(want))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != want {
			t.Fatalf("POST %d: %d %q, want the body echoed", i, resp.StatusCode, got)
		}
	}
}

// TestEncodedPathsCannotBypassPathRules denies /admin and sends encoded and
// dot-segment variants: each is denied, or refused as ambiguous, and the
// application never sees an admin path.
func TestEncodedPathsCannotBypassPathRules(t *testing.T) {
	iss := newIssuer(t)
	var seen []string
	var mu sync.Mutex
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.URL.Path)
		mu.Unlock()
		_, _ = io.WriteString(w, "ok")
	}))
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "deny.yaml"), []byte(`apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shipping}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	in := freeAddr(t)
	cfg := ordersConfig(in, app, config.ProtocolHTTP)
	cfg.Policies = dir
	startProxy(t, cfg, iss.holderFor(ordersID))
	for _, path := range []string{"/admin", "/%61dmin", "/x/%2e%2e/admin", "/x/../admin", "/admin%2F", "/admin/%2e/x", "/ADMIN/../admin"} {
		c, err := net.DialTimeout("tcp", in, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 403 or 400", path, resp.StatusCode)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) > 0 {
		t.Fatalf("the application saw %q", seen)
	}
}

// TestStrictAppliesToOpenConnections switches a port to STRICT while a
// plaintext keep-alive connection is open: its next request is refused.
func TestStrictAppliesToOpenConnections(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	dir := t.TempDir()
	in := freeAddr(t)
	cfg := ordersConfig(in, app, config.ProtocolHTTP)
	cfg.Policies = dir
	startProxy(t, cfg, iss.holderFor(ordersID))
	c, err := net.DialTimeout("tcp", in, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	get := func() int {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != 200 {
		t.Fatalf("plaintext under PERMISSIVE: %d", code)
	}
	if err := os.WriteFile(filepath.Join(dir, "strict.yaml"), []byte("apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shipping}\nspec: {mtls: {mode: STRICT}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for get() != http.StatusForbidden {
		if time.Now().After(deadline) {
			t.Fatal("the open plaintext connection still served requests after the switch to STRICT")
		}
		time.Sleep(100 * time.Millisecond) // polling interval while the proxy reloads
	}
}

// TestPeerCertificateExpiryAndRotation: a pooled mesh connection lives no
// longer than the certificate it was opened with. The server closes it when
// the client's certificate expires (and refuses to re-handshake with it);
// after the client rotates, its requests go out on new connections with the
// new certificate.
func TestPeerCertificateExpiryAndRotation(t *testing.T) {
	iss := newIssuer(t)
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	in, out := freeAddr(t), freeAddr(t)
	startProxy(t, ordersConfig(in, app, config.ProtocolHTTP), iss.holderFor(ordersID))

	// A client certificate that expires two seconds from now.
	at := time.Now().Add(-ca.MinWorkloadTTL + 2*time.Second)
	past, err := ca.Load(ca.Config{StateDir: iss.dir, Now: func() time.Time { return at }})
	if err != nil {
		t.Fatal(err)
	}
	const checkout = "spiffe://cluster.local/ns/default/sa/checkout"
	client := &identity.Holder{}
	client.Set(signSVID(t, past, checkout, at))
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}), client)
	hc := &http.Client{Timeout: 5 * time.Second}
	status := func() int {
		resp, err := hc.Get("http://" + out + "/")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := status(); code != 200 {
		t.Fatalf("before expiry: %d", code)
	}
	deadline := time.Now().Add(10 * time.Second)
	for status() == 200 {
		if time.Now().After(deadline) {
			t.Fatal("requests still succeed with a client certificate that expired")
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	client.Set(iss.svid(checkout))
	if code := status(); code != 200 {
		t.Fatalf("after the client rotated: %d", code)
	}
}

// TestStrictClosesOpenPlaintextStreams switches a TCP port to STRICT while
// a plaintext stream is open through it: the proxy closes the stream.
func TestStrictClosesOpenPlaintextStreams(t *testing.T) {
	iss := newIssuer(t)
	dir := t.TempDir()
	in := freeAddr(t)
	cfg := ordersConfig(in, echoServer(t), config.ProtocolTCP)
	cfg.Policies = dir
	startProxy(t, cfg, iss.holderFor(ordersID))
	c, err := net.DialTimeout("tcp", in, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := pingPong(c); err != nil {
		t.Fatalf("plaintext stream under PERMISSIVE: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "strict.yaml"), []byte("apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shipping}\nspec: {mtls: {mode: STRICT}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The proxy reloads within a few seconds and closes the stream: a read
	// then ends instead of waiting.
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read data from a stream that should have been closed")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the plaintext stream stayed open after the switch to STRICT")
	}
}
