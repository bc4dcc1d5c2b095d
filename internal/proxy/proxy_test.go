package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// issuer hands out SVIDs from a real CA.
type issuer struct {
	t   testing.TB
	ca  *ca.CA
	dir string
}

func newIssuer(t testing.TB) *issuer {
	dir := t.TempDir()
	// The CA was made two hours ago, so that tests can also have it sign
	// certificates that have already expired.
	born := time.Now().Add(-2 * time.Hour)
	if _, err := ca.Init(ca.Config{StateDir: dir, Now: func() time.Time { return born }}, ca.InitOptions{TrustDomain: "cluster.local"}); err != nil {
		t.Fatal(err)
	}
	authority, err := ca.Load(ca.Config{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return &issuer{t: t, ca: authority, dir: dir}
}

func (i *issuer) svid(id string) *identity.SVID {
	i.t.Helper()
	return signSVID(i.t, i.ca, id, time.Now())
}

// signSVID has authority sign a new key for id, as a workload would ask.
func signSVID(t testing.TB, authority *ca.CA, id string, now time.Time) *identity.SVID {
	t.Helper()
	sid := spiffeid.RequireFromString(id)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{sid.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := authority.Sign(csr, sid, ca.MinWorkloadTTL)
	if err != nil {
		t.Fatal(err)
	}
	s, err := identity.NewSVID(chain, key, authority.Bundle(), now)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// serveApp runs h as the local application on loopback and returns its port.
func serveApp(t testing.TB, h http.Handler) uint32 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return uint32(l.Addr().(*net.TCPAddr).Port)
}

const ordersID = "spiffe://cluster.local/ns/shipping/sa/orders-api"

// ordersConfig is the configuration of orders-api's sidecar with one
// inbound port forwarding to appPort.
func ordersConfig(listen string, appPort uint32, protocol config.Protocol) *config.Config {
	return &config.Config{
		APIVersion: "trellis.dev/v1", Kind: "ProxyConfig",
		Workload: config.Workload{Namespace: "shipping", Name: "orders-api"},
		Inbound:  []config.Inbound{{Listen: listen, AppPort: appPort, Protocol: protocol}},
	}
}

// checkoutConfig is the configuration of the calling sidecar (default/
// checkout) with the given outbound destinations.
func checkoutConfig(outbound ...config.Outbound) *config.Config {
	return &config.Config{
		APIVersion: "trellis.dev/v1", Kind: "ProxyConfig",
		Workload: config.Workload{Namespace: "default", Name: "checkout"},
		Outbound: outbound,
	}
}

// holderFor returns a holder with a fresh SVID for id.
func (i *issuer) holderFor(id string) *identity.Holder {
	h := &identity.Holder{}
	h.Set(i.svid(id))
	return h
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startProxy runs a proxy until the test ends; opts adjust its options.
func startProxy(t testing.TB, cfg *config.Config, h *identity.Holder, opts ...func(*Options)) *Proxy {
	t.Helper()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	o := Options{Config: cfg, Identity: h, Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	for _, f := range opts {
		f(&o)
	}
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("proxy Run: %v", err)
		}
	})
	for _, l := range cfg.ListenAddrs() {
		waitListening(t, l)
	}
	return p
}

func waitListening(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening: %v", addr, err)
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// TestRotationUnderLoad swaps both sidecars' certificates every few
// milliseconds while HTTP requests and TCP streams (each a fresh mTLS
// handshake) flow: not one may fail.
func TestRotationUnderLoad(t *testing.T) {
	iss := newIssuer(t)
	const serverID, clientID = ordersID, "spiffe://cluster.local/ns/default/sa/checkout"
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	echo := echoServer(t)

	httpIn, tcpIn, httpOut, tcpOut := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	serverH, clientH := iss.holderFor(serverID), iss.holderFor(clientID)
	serverCfg := ordersConfig(httpIn, app, config.ProtocolHTTP)
	serverCfg.Inbound = append(serverCfg.Inbound, config.Inbound{Listen: tcpIn, AppPort: echo, Protocol: config.ProtocolTCP})
	startProxy(t, serverCfg, serverH)
	startProxy(t, checkoutConfig(config.Outbound{Listen: httpOut, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: httpIn, Identity: serverID}}},
		config.Outbound{Listen: tcpOut, Service: "echo.shipping", Protocol: config.ProtocolTCP, Endpoints: []config.Endpoint{{Address: tcpIn, Identity: serverID}}}), clientH)

	stop := make(chan struct{})
	var rotations atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			serverH.Set(iss.svid(serverID))
			clientH.Set(iss.svid(clientID))
			rotations.Add(1)
		}
	}()

	var failures atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	client := &http.Client{Timeout: 10 * time.Second}
	const workers, perWorker = 4, 150
	var load sync.WaitGroup
	for w := range workers {
		load.Add(1)
		go func() {
			defer load.Done()
			for i := range perWorker {
				if w%2 == 0 {
					resp, err := client.Get("http://" + httpOut + "/")
					if err != nil {
						fail(err)
						continue
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 || string(body) != "ok" {
						fail(fmt.Errorf("status %d body %q", resp.StatusCode, body))
					}
					continue
				}
				c, err := net.DialTimeout("tcp", tcpOut, 5*time.Second)
				if err != nil {
					fail(err)
					continue
				}
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				msg := fmt.Sprintf("stream %d-%d\n", w, i)
				_, _ = io.WriteString(c, msg)
				buf := make([]byte, len(msg))
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
					fail(fmt.Errorf("echo %q: got %q, %v", msg, buf, err))
				}
				c.Close()
			}
		}()
	}
	load.Wait()
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d requests/streams failed during %d rotations; first: %v", n, workers*perWorker, rotations.Load(), firstErr.Load())
	}
	if rotations.Load() < 10 {
		t.Fatalf("only %d rotations happened during the load; the test did not exercise rotation", rotations.Load())
	}
	t.Logf("%d requests and streams, %d certificate rotations, no failure", workers*perWorker, rotations.Load())
}

// TestDrainFinishesInFlightRequests stops a proxy while a slow request is
// in flight: the request completes, new connections are refused.
func TestDrainFinishesInFlightRequests(t *testing.T) {
	iss := newIssuer(t)
	release := make(chan struct{})
	started := make(chan struct{})
	app := serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		_, _ = io.WriteString(w, "finished")
	}))
	in := freeAddr(t)
	cfg := ordersConfig(in, app, config.ProtocolHTTP)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	p, err := New(Options{Config: cfg, Identity: iss.holderFor(ordersID)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	waitListening(t, in)

	result := make(chan string, 1)
	go func() {
		resp, err := http.Get("http://" + in + "/") // plaintext: PERMISSIVE without policies
		if err != nil {
			result <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		result <- string(b)
	}()
	<-started
	cancel()
	// Shutdown has begun: the listener closes and Ready turns false.
	deadline := time.Now().Add(5 * time.Second)
	for p.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("proxy still ready after shutdown began")
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
	close(release)
	if got := <-result; got != "finished" {
		t.Fatalf("in-flight request during drain: %q", got)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", in, time.Second); err == nil {
		c.Close()
		t.Fatal("listener still accepting after shutdown")
	}
}
