package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/discovery"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

const testConfig = `
apiVersion: trellis.dev/v1
kind: ControlPlane
listen: 127.0.0.1:0
adminListen: 127.0.0.1:0
resources: policies
gracePeriod: 1h
workloads:
  - {namespace: shipping, name: orders, serviceAccount: orders, labels: {app: orders}, ports: [{port: 8080, protocol: http}]}
  - {namespace: shipping, name: billing, serviceAccount: billing, labels: {app: billing}, ports: [{port: 9090}]}
  - {namespace: web, name: frontend, serviceAccount: frontend, labels: {app: frontend}, ports: [{port: 8080}]}
services:
  - {namespace: shipping, name: orders, selector: {app: orders}, address: 198.18.128.1, ports: [{name: http, port: 80, targetPort: 8080}]}
  - {namespace: web, name: frontend, selector: {app: frontend}, ports: [{name: http, port: 80, targetPort: 8080}]}
unmeshedWorkloads:
  - {namespace: web, name: legacy}
`

const shippingStrict = `
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shipping}
spec: {mtls: {mode: STRICT}}
`

// testMesh is a control plane running in the test, with its files in a
// temporary directory.
type testMesh struct {
	t      *testing.T
	dir    string
	cfg    *Config
	cp     *ControlPlane
	cancel context.CancelFunc
	done   chan error
	// dialed holds the instances of the fake proxies opened, for settle.
	dialed map[string]bool
}

func startMesh(t *testing.T, dir string) *testMesh {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "policies"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := ParseConfig([]byte(testConfig), dir)
	if err != nil {
		t.Fatal(err)
	}
	m := &testMesh{t: t, dir: dir, cfg: cfg}
	m.start()
	t.Cleanup(m.stop)
	return m
}

func (m *testMesh) start() {
	m.t.Helper()
	cp, err := New(Options{Config: m.cfg, Log: testLogger(m.t), Init: true, Coalesce: 20 * time.Millisecond})
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.cp, m.cancel, m.done = cp, cancel, make(chan error, 1)
	go func() { m.done <- cp.Run(ctx) }()
}

func (m *testMesh) stop() {
	if m.cancel == nil {
		return
	}
	m.cancel()
	if err := <-m.done; err != nil {
		m.t.Errorf("control plane: %v", err)
	}
	m.cancel = nil
}

func (m *testMesh) writePolicy(name, content string) {
	m.t.Helper()
	// Written beside the directory and renamed into it, so that the watcher
	// never loads a half-written file (an empty one would pass as valid).
	tmp := filepath.Join(m.dir, name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "policies", name)); err != nil {
		m.t.Fatal(err)
	}
}

// grpcConn is a connection to the control plane with an SVID for ns/sa,
// closed when the test ends.
func (m *testMesh) grpcConn(ns, sa string) *grpc.ClientConn {
	m.t.Helper()
	holder := m.svid(ns, sa)
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS13}
	tlsconfig.HookTLSClientConfig(tlsCfg, holder, tlsconfig.AuthorizeID(meshid.ControlPlane(m.cp.CA().TrustDomain())))
	tlsCfg.GetClientCertificate = holder.GetClientCertificate
	conn, err := grpc.NewClient(m.cp.Addr(), grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { conn.Close() })
	return conn
}

// svid issues a certificate for ns/sa from the test CA.
func (m *testMesh) svid(ns, sa string) *identity.Holder {
	m.t.Helper()
	return m.svidTTL(ns, sa, time.Hour)
}

func (m *testMesh) svidTTL(ns, sa string, ttl time.Duration) *identity.Holder {
	m.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		m.t.Fatal(err)
	}
	id, err := meshid.Workload(m.cp.CA().TrustDomain(), ns, sa)
	if err != nil {
		m.t.Fatal(err)
	}
	chain, err := m.cp.CA().SignPublicKey(key.Public(), id, ttl)
	if err != nil {
		m.t.Fatal(err)
	}
	s, err := identity.NewSVID(chain, key, m.cp.CA().Bundle(), time.Now())
	if err != nil {
		m.t.Fatal(err)
	}
	h := &identity.Holder{}
	h.Set(s)
	return h
}

// fakeProxy speaks the discovery protocol the way a proxy does, recording
// what it receives; acknowledging is left to the test.
type fakeProxy struct {
	t        *testing.T
	instance string // namespace/workload/instance, as in the status
	conn     *grpc.ClientConn
	stream   discoveryv1.Discovery_StreamClient
	updates  chan *discoveryv1.Update // merged: whole configurations
	raw      chan *discoveryv1.Update // as received
	errs     chan error
}

func (m *testMesh) connect(ns, sa, workload, instance string, ports map[uint32]string) (*fakeProxy, error) {
	m.t.Helper()
	hello := &discoveryv1.Hello{Workload: workload, Instance: instance}
	for p, a := range ports {
		hello.Ports = append(hello.Ports, &discoveryv1.PortAddress{Port: p, Address: a})
	}
	return m.dial(ns, sa, hello)
}

// dial opens a stream with an SVID for ns/sa and sends hello.
func (m *testMesh) dial(ns, sa string, hello *discoveryv1.Hello) (*fakeProxy, error) {
	m.t.Helper()
	conn := m.grpcConn(ns, sa)
	ctx, cancel := context.WithCancel(context.Background())
	m.t.Cleanup(cancel)
	stream, err := discoveryv1.NewDiscoveryClient(conn).Stream(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Hello{Hello: hello}}); err != nil {
		return nil, err
	}
	fp := &fakeProxy{t: m.t, conn: conn, instance: ns + "/" + hello.GetWorkload() + "/" + hello.GetInstance(), stream: stream, updates: make(chan *discoveryv1.Update, 100), raw: make(chan *discoveryv1.Update, 100), errs: make(chan error, 1)}
	go func() {
		// Like a proxy, keep the destinations and merge incremental
		// updates into them; tests see whole updates (and raw ones).
		have := map[string]*discoveryv1.Destination{}
		for {
			u, err := stream.Recv()
			if err != nil {
				fp.errs <- err
				return
			}
			fp.raw <- u
			if !u.GetIncremental() {
				have = map[string]*discoveryv1.Destination{}
			}
			for _, k := range u.GetRemovedDestinations() {
				delete(have, fmt.Sprintf("%s:%d", k.GetService(), k.GetPort()))
			}
			for _, d := range u.GetDestinations() {
				have[fmt.Sprintf("%s:%d", d.GetService(), d.GetPort())] = d
			}
			whole := proto.Clone(u).(*discoveryv1.Update)
			whole.Incremental, whole.RemovedDestinations, whole.Destinations = false, nil, nil
			for _, k := range slices.Sorted(maps.Keys(have)) {
				whole.Destinations = append(whole.Destinations, have[k])
			}
			fp.updates <- whole
		}
	}()
	if m.dialed == nil {
		m.dialed = map[string]bool{}
	}
	m.dialed[fp.instance] = true
	return fp, nil
}

// settle acks fp's updates until it has the view the control plane holds
// for it once every proxy opened so far is registered: each registration
// changes the endpoints all views show, so a first update may be followed
// by others.
func (m *testMesh) settle(fp *fakeProxy) *discoveryv1.Update {
	m.t.Helper()
	waitFor(m.t, "every proxy to register", func() bool {
		connected := 0
		for _, p := range m.cp.Status().Proxies {
			if m.dialed[p.Instance] && p.Connected {
				connected++
			}
		}
		return connected == len(m.dialed)
	})
	m.cp.Sync()
	want := ""
	for _, p := range m.cp.Status().Proxies {
		if p.Instance == fp.instance {
			want = p.CurrentVersion
		}
	}
	for {
		u := fp.next()
		fp.ack(u, "")
		if u.GetVersion() == want {
			return u
		}
	}
}

// next waits for the next update.
func (fp *fakeProxy) next() *discoveryv1.Update {
	fp.t.Helper()
	select {
	case u := <-fp.updates:
		return u
	case err := <-fp.errs:
		fp.t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		fp.t.Fatal("no update within 10s")
	}
	return nil
}

// none checks that no update arrives within d.
func (fp *fakeProxy) none(d time.Duration) {
	fp.t.Helper()
	select {
	case u := <-fp.updates:
		fp.t.Fatalf("unexpected update %s", u.GetVersion())
	case <-time.After(d):
	}
}

func (fp *fakeProxy) ack(u *discoveryv1.Update, reason string) {
	fp.t.Helper()
	err := fp.stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Ack{Ack: &discoveryv1.Ack{Version: u.GetVersion(), Error: reason}}})
	if err != nil {
		fp.t.Fatal(err)
	}
}

func (fp *fakeProxy) goodbye() {
	fp.t.Helper()
	if err := fp.stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Goodbye{Goodbye: &discoveryv1.Goodbye{}}}); err != nil {
		fp.t.Fatal(err)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func endpoints(u *discoveryv1.Update, service string) []string {
	var out []string
	for _, d := range u.GetDestinations() {
		if d.GetService() == service {
			for _, e := range d.GetEndpoints() {
				out = append(out, e.GetAddress()+"="+e.GetIdentity())
			}
		}
	}
	return out
}

func TestRegistrationNeedsMatchingIdentity(t *testing.T) {
	m := startMesh(t, "")
	tests := []struct {
		name, ns, sa, workload string
		code                   codes.Code
		ports                  map[uint32]string
	}{
		{"other service account", "shipping", "billing", "orders", codes.PermissionDenied, nil},
		{"other namespace", "web", "orders", "orders", codes.PermissionDenied, nil},
		{"undeclared workload", "shipping", "orders", "ghost", codes.PermissionDenied, nil},
		{"undeclared port", "shipping", "orders", "orders", codes.InvalidArgument, map[uint32]string{9999: "127.0.0.1:1"}},
		{"bad address", "shipping", "orders", "orders", codes.InvalidArgument, map[uint32]string{8080: "nowhere"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fp, err := m.connect(tc.ns, tc.sa, tc.workload, "i1", tc.ports)
			if err == nil {
				select {
				case err = <-fp.errs:
				case u := <-fp.updates:
					t.Fatalf("registered and sent %v", u)
				case <-time.After(10 * time.Second):
					t.Fatal("no answer")
				}
			}
			if status.Code(err) != tc.code {
				t.Fatalf("got %v, want code %v", err, tc.code)
			}
		})
	}
	// The refused proxies left no trace; the right identity registers.
	if got := m.cp.Status().Proxies; len(got) != 0 {
		t.Fatalf("refused proxies are listed: %+v", got)
	}
	fp, err := m.connect("shipping", "orders", "orders", "i1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	// The first update may predate the registration; the next has it.
	for {
		got := endpoints(fp.next(), "orders.shipping")
		if len(got) == 0 {
			continue
		}
		if len(got) != 1 || got[0] != "127.0.0.1:18080=spiffe://cluster.local/ns/shipping/sa/orders" {
			t.Fatalf("orders endpoints = %v", got)
		}
		break
	}
}

func TestPolicyChangeReachesOnlyItsNamespace(t *testing.T) {
	m := startMesh(t, "")
	orders, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	front, err := m.connect("web", "frontend", "frontend", "f1", map[uint32]string{8080: "127.0.0.1:28080"})
	if err != nil {
		t.Fatal(err)
	}
	m.settle(orders)
	frontView := m.settle(front)
	waitFor(t, "convergence", func() bool { return m.cp.Status().Converged })

	m.writePolicy("shipping.yaml", shippingStrict)
	u := orders.next()
	if len(u.GetPeerAuthentications()) != 1 || u.GetPeerAuthentications()[0].GetMtlsMode() != "STRICT" {
		t.Fatalf("orders got %v, want the STRICT PeerAuthentication", u.GetPeerAuthentications())
	}
	front.none(500 * time.Millisecond)
	for _, p := range m.cp.Status().Proxies {
		if p.Workload == "web/frontend" && (p.CurrentVersion != frontView.GetVersion() || !p.InSync) {
			t.Fatalf("frontend's view changed with a shipping policy: %+v", p)
		}
		if p.Workload == "shipping/orders" && p.InSync {
			t.Fatalf("orders is in sync before acknowledging: %+v", p)
		}
	}
	orders.ack(u, "")
	waitFor(t, "orders to be in sync", func() bool { return m.cp.Status().Converged })

	// A mesh-wide policy reaches both.
	m.writePolicy("mesh.yaml", strings.ReplaceAll(shippingStrict, "namespace: shipping", "namespace: trellis-system"))
	orders.next()
	front.next()
}

func TestInvalidChangeKeepsLastGoodConfiguration(t *testing.T) {
	m := startMesh(t, "")
	m.writePolicy("shipping.yaml", shippingStrict)
	waitFor(t, "the policy to load", func() bool { return len(m.cp.Status().Resources.Files) == 1 })
	orders, err := m.connect("shipping", "orders", "orders", "o1", nil)
	if err != nil {
		t.Fatal(err)
	}
	m.settle(orders)
	version := m.cp.Status().Resources.Version

	m.writePolicy("shipping.yaml", strings.Replace(shippingStrict, "STRICT", "STRIKT", 1))
	waitFor(t, "the rejection to be reported", func() bool { return len(m.cp.Status().Resources.Error) > 0 })
	st := m.cp.Status()
	e := st.Resources.Error[0]
	if !strings.HasSuffix(e.File, "shipping.yaml") || e.Field != "spec.mtls.mode" || !strings.Contains(e.Message, "STRIKT") {
		t.Fatalf("error = %+v, want file shipping.yaml, field spec.mtls.mode, naming the bad value", e)
	}
	if st.Resources.Version != version {
		t.Fatalf("version changed to %s after a rejected change", st.Resources.Version)
	}
	orders.none(300 * time.Millisecond)

	m.writePolicy("shipping.yaml", strings.Replace(shippingStrict, "STRICT", "PERMISSIVE", 1))
	u := orders.next()
	if got := u.GetPeerAuthentications()[0].GetMtlsMode(); got != "PERMISSIVE" {
		t.Fatalf("mode = %s after the fix", got)
	}
	if st := m.cp.Status(); len(st.Resources.Error) != 0 || st.Resources.Version == version {
		t.Fatalf("after the fix: %+v", st.Resources)
	}
}

func TestNackIsReported(t *testing.T) {
	m := startMesh(t, "")
	orders, err := m.connect("shipping", "orders", "orders", "o1", nil)
	if err != nil {
		t.Fatal(err)
	}
	u := orders.next()
	orders.ack(u, "cannot apply: test refusal")
	waitFor(t, "the NACK to show", func() bool {
		p := m.cp.Status().Proxies
		return len(p) == 1 && p[0].Rejected == "cannot apply: test refusal" && p[0].RejectedVersion == u.GetVersion() && !p[0].InSync
	})
	if m.cp.Status().Converged {
		t.Fatal("converged with a proxy that rejected its configuration")
	}
}

func TestDisconnectKeepsEndpointsForGracePeriodAndGoodbyeRemoves(t *testing.T) {
	m := startMesh(t, "")
	front, err := m.connect("web", "frontend", "frontend", "f1", nil)
	if err != nil {
		t.Fatal(err)
	}
	m.settle(front)
	orders, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	if got := endpoints(m.settle(front), "orders.shipping"); len(got) != 1 {
		t.Fatalf("orders endpoints = %v", got)
	}
	// A dropped connection (no goodbye) keeps the endpoint: grace is 1h.
	orders.stream.CloseSend()
	waitFor(t, "the disconnect", func() bool {
		for _, p := range m.cp.Status().Proxies {
			if p.Instance == "shipping/orders/o1" {
				return !p.Connected
			}
		}
		return false
	})
	front.none(300 * time.Millisecond)

	// It comes back and says goodbye: its endpoint goes at once.
	orders, err = m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	orders.next()
	orders.goodbye()
	if got := endpoints(front.next(), "orders.shipping"); len(got) != 0 {
		t.Fatalf("orders endpoints after goodbye = %v", got)
	}
}

func TestRestartKeepsRegistrationsAndCA(t *testing.T) {
	m := startMesh(t, "")
	root := m.cp.CA().Bundle()[0]
	front, err := m.connect("web", "frontend", "frontend", "f1", nil)
	if err != nil {
		t.Fatal(err)
	}
	m.settle(front)
	orders, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	m.settle(orders)
	before := m.settle(front)

	m.stop()
	m.start()
	if !m.cp.CA().Bundle()[0].Equal(root) {
		t.Fatal("the root changed across a restart")
	}
	// Before any proxy reconnects, the endpoint is still served.
	if got := endpoints(&discoveryv1.Update{Destinations: destinationsOf(m.cp)}, "orders.shipping"); len(got) != 1 {
		t.Fatalf("orders endpoints after restart = %v", got)
	}
	// A proxy that reconnects with the version it runs is sent nothing.
	front2, err := m.dial("web", "frontend", &discoveryv1.Hello{Workload: "frontend", Instance: "f1", Version: before.GetVersion()})
	if err != nil {
		t.Fatal(err)
	}
	front2.none(300 * time.Millisecond)
	waitFor(t, "convergence", func() bool { return m.cp.Status().Converged })
}

func destinationsOf(cp *ControlPlane) []*discoveryv1.Destination {
	var out []*discoveryv1.Destination
	for _, d := range cp.registry.Snapshot().Destinations() {
		pd := &discoveryv1.Destination{Service: d.Service}
		for _, e := range d.Endpoints {
			pd.Endpoints = append(pd.Endpoints, &discoveryv1.Endpoint{Address: e.Address, Identity: e.Identity})
		}
		out = append(out, pd)
	}
	return out
}

func TestAdminAPIAuthentication(t *testing.T) {
	m := startMesh(t, "")
	c, err := Dial(m.cfg.StateDir, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatalf("with the credential: %v", err)
	}
	c.token = "wrong"
	_, err = c.Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("with a wrong credential: %v, want 401", err)
	}
	fi, err := os.Stat(filepath.Join(m.cfg.StateDir, AdminTokenFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin token file: %v %v", fi, err)
	}
	// A server that is not this mesh's control plane is refused.
	other := startMesh(t, "")
	c2, err := Dial(m.cfg.StateDir, other.cp.AdminAddr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Status(context.Background()); err == nil || !strings.Contains(err.Error(), "not part of this mesh") {
		t.Fatalf("another mesh's control plane was trusted: %v", err)
	}
}

func TestStartupRefusesInvalidResources(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "policies"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "policies", "bad.yaml"), []byte(strings.Replace(shippingStrict, "STRICT", "STRIKT", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig([]byte(testConfig), dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(Options{Config: cfg, Init: true})
	if err == nil || !strings.Contains(err.Error(), "STRIKT") {
		t.Fatalf("New = %v, want the policy error", err)
	}
}

func TestSecondConnectionOfAnInstanceTakesOver(t *testing.T) {
	m := startMesh(t, "")
	first, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	first.next()
	second, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	second.next()
	select {
	case err := <-first.errs:
		if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "--instance") {
			t.Fatalf("the replaced stream ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the replaced stream was not ended")
	}
	waitFor(t, "one row for the instance", func() bool {
		p := m.cp.Status().Proxies
		return len(p) == 1 && p[0].Connected
	})
}

func TestAddressOfAConnectedInstanceIsRefused(t *testing.T) {
	m := startMesh(t, "")
	orders, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "10.0.0.5:8080"})
	if err != nil {
		t.Fatal(err)
	}
	orders.next()
	front, err := m.connect("web", "frontend", "frontend", "f1", map[uint32]string{8080: "10.0.0.5:8080"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-front.errs:
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "shipping/orders/o1") {
			t.Fatalf("a second instance at the same address: %v", err)
		}
	case u := <-front.updates:
		t.Fatalf("registered at a taken address: %v", u)
	case <-time.After(10 * time.Second):
		t.Fatal("no answer")
	}
}

// A restart while the directory holds a rejected edit starts from the
// last valid resources and reports the problem.
func TestRestartWithRejectedEditKeepsLastGood(t *testing.T) {
	m := startMesh(t, "")
	m.writePolicy("shipping.yaml", shippingStrict)
	waitFor(t, "the policy to load", func() bool { return len(m.cp.Status().Resources.Files) == 1 })
	m.writePolicy("shipping.yaml", strings.Replace(shippingStrict, "STRICT", "STRIKT", 1))
	waitFor(t, "the rejection", func() bool { return len(m.cp.Status().Resources.Error) > 0 })
	m.stop()
	m.start()
	if st := m.cp.Status(); len(st.Resources.Error) == 0 {
		t.Fatalf("the rejected edit is not reported after the restart: %+v", st.Resources)
	}
	orders, err := m.connect("shipping", "orders", "orders", "o1", nil)
	if err != nil {
		t.Fatal(err)
	}
	u := orders.next()
	if len(u.GetPeerAuthentications()) != 1 || u.GetPeerAuthentications()[0].GetMtlsMode() != "STRICT" {
		t.Fatalf("after the restart the proxy got %v, want the last valid STRICT policy", u.GetPeerAuthentications())
	}
}

// The proxy's client reconnects with a renewed certificate (a TLS
// connection keeps the certificate of its handshake), without being sent
// its configuration again.
func TestClientReconnectsWithRenewedCertificate(t *testing.T) {
	m := startMesh(t, "")
	holder := m.svid("shipping", "orders")
	applied := make(chan string, 10)
	client, err := discovery.New(discovery.Config{
		Addr: m.cp.Addr(), ServerID: meshid.ControlPlane(m.cp.CA().TrustDomain()), Holder: holder,
		Workload: "orders", Instance: "o1", Log: testLogger(t),
		Apply: func(u *discoveryv1.Update) error { applied <- u.GetVersion(); return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- client.Run(ctx) }()
	defer func() { cancel(); <-done }()
	<-client.Synced()
	expiry := func() time.Time {
		for _, p := range m.cp.Status().Proxies {
			if p.Connected {
				return p.CertificateExpiry
			}
		}
		return time.Time{}
	}
	first := holder.Current().NotAfter()
	waitFor(t, "the first certificate in status", func() bool { return expiry().Equal(first) })

	renewed := m.svidTTL("shipping", "orders", 2*time.Hour).Current()
	holder.Set(renewed)
	waitFor(t, "the renewed certificate in status", func() bool { return expiry().Equal(renewed.NotAfter()) })
	for len(applied) > 0 {
		<-applied
	}
	select {
	case v := <-applied:
		if v != client.Version() {
			t.Fatalf("a new version %s was applied after the reconnect", v)
		}
	case <-time.After(300 * time.Millisecond):
	}
}

// After the first, updates carry only the destinations that changed; a
// refused incremental update is followed by the whole configuration.
func TestUpdatesAreIncrementalAfterTheFirst(t *testing.T) {
	m := startMesh(t, "")
	front, err := m.connect("web", "frontend", "frontend", "f1", map[uint32]string{8080: "127.0.0.1:28080"})
	if err != nil {
		t.Fatal(err)
	}
	first := <-front.raw
	front.next()
	if first.GetIncremental() || len(first.GetDestinations()) != 2 {
		t.Fatalf("first update: incremental=%v, %d destinations; want whole, 2", first.GetIncremental(), len(first.GetDestinations()))
	}
	wholeSize := proto.Size(first)
	// Wait for the update the frontend's own registration caused.
	for len(endpoints(first, "frontend.web")) == 0 {
		first = <-front.raw
		front.next()
	}
	orders, err := m.connect("shipping", "orders", "orders", "o1", map[uint32]string{8080: "127.0.0.1:18080"})
	if err != nil {
		t.Fatal(err)
	}
	orders.next()
	var u *discoveryv1.Update
	for {
		u = <-front.raw
		whole := front.next()
		if len(endpoints(whole, "orders.shipping")) == 1 {
			break
		}
	}
	if !u.GetIncremental() || len(u.GetDestinations()) != 1 || u.GetDestinations()[0].GetService() != "orders.shipping" {
		t.Fatalf("update after an orders endpoint appeared: incremental=%v destinations=%v; want only orders.shipping", u.GetIncremental(), u.GetDestinations())
	}
	t.Logf("incremental update %d bytes, the first (whole) %d", proto.Size(u), wholeSize)

	// The frontend refuses it: the control plane sends everything again.
	front.ack(u, "test refusal")
	again := <-front.raw
	front.next()
	if again.GetIncremental() || again.GetVersion() != u.GetVersion() || len(again.GetDestinations()) != 2 {
		t.Fatalf("after a refused incremental update: incremental=%v version=%s (refused %s) destinations=%d; want the whole same version",
			again.GetIncremental(), again.GetVersion(), u.GetVersion(), len(again.GetDestinations()))
	}
	// A whole update refused is not resent until something changes.
	front.ack(again, "test refusal")
	select {
	case x := <-front.raw:
		t.Fatalf("a refused whole update was resent: %s", x.GetVersion())
	case <-time.After(300 * time.Millisecond):
	}
}
