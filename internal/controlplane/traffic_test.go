package controlplane

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/push"
)

// TestTrafficView: the control plane scrapes the stats address a proxy
// registered, and names the ends of each edge by workload, marking the
// plaintext ones with why; workloads without sidecar are listed as not
// meshed.
func TestTrafficView(t *testing.T) {
	var served atomic.Int64
	started := time.Now().Add(-time.Hour).Unix()
	stats := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n := served.Add(1) * 10 // counters grow between scrapes
		fmt.Fprintf(w, "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %d\n", started)
		fmt.Fprintf(w, "# TYPE trellis_requests_total counter\n")
		for _, src := range []struct{ id, tls string }{{"spiffe://cluster.local/ns/web/sa/frontend", "true"}, {"unknown", "false"}} {
			fmt.Fprintf(w, "trellis_requests_total{decision=\"allow\",destination=\"spiffe://cluster.local/ns/shipping/sa/orders\",direction=\"inbound\",policy=\"\",source=%q,status_class=\"2xx\",tls=%q} %d\n", src.id, src.tls, n)
		}
		fmt.Fprintf(w, "trellis_requests_total{decision=\"\",destination=\"passthrough\",direction=\"outbound\",policy=\"\",source=\"spiffe://cluster.local/ns/shipping/sa/orders\",status_class=\"2xx\",tls=\"false\"} %d\n", n)
	}))
	defer stats.Close()
	m := startMesh(t, "")
	orders, err := m.dial("shipping", "orders", &discoveryv1.Hello{Workload: "orders", Instance: "o1", StatsAddress: strings.TrimPrefix(stats.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	m.settle(orders)

	// Two scrapes with traffic between them; the query right after uses
	// them as they are.
	m.cp.telemetry.Scrape(context.Background())
	m.cp.telemetry.Scrape(context.Background())
	tr := m.cp.Traffic(context.Background(), time.Minute)
	if len(tr.ScrapeErrors) != 0 {
		t.Fatalf("scrape errors: %v", tr.ScrapeErrors)
	}
	byName := map[string]WorkloadTraffic{}
	for _, w := range tr.Workloads {
		byName[w.Workload] = w
	}
	if w := byName["shipping/orders"]; !w.Meshed || w.Proxies != 1 || w.RequestsPerSecond <= 0 || w.SuccessRate == nil || *w.SuccessRate != 1 {
		t.Fatalf("orders: %+v", w)
	}
	if w, ok := byName["web/legacy"]; !ok || w.Meshed {
		t.Fatalf("legacy (no sidecar) is not listed as unmeshed: %+v", tr.Workloads)
	}
	want := map[string]string{
		"web/frontend → shipping/orders":   "",
		NoSidecar + " → shipping/orders":   "the caller has no sidecar",
		"shipping/orders → " + OutsideMesh: "the destination is outside the mesh",
	}
	for _, e := range tr.Edges {
		key := e.Source + " → " + e.Destination
		reason, ok := want[key]
		if !ok {
			t.Errorf("unexpected edge %s: %+v", key, e)
			continue
		}
		delete(want, key)
		if e.MTLS != (reason == "") || !strings.HasPrefix(e.Plaintext, reason) {
			t.Errorf("edge %s: mtls %v, plaintext %q", key, e.MTLS, e.Plaintext)
		}
	}
	if len(want) > 0 {
		t.Fatalf("missing edges %v in %+v", want, tr.Edges)
	}
}

// TestTapStreams: a proxy's tap stream is accepted for its own instance
// only; a tap reaches it and its events come back to that tap.
func TestTapStreams(t *testing.T) {
	m := startMesh(t, "")
	orders, err := m.connect("shipping", "orders", "orders", "o1", nil)
	if err != nil {
		t.Fatal(err)
	}
	m.settle(orders)
	open := func(conn *grpc.ClientConn, workload, instance string) discoveryv1.Discovery_TapClient {
		t.Helper()
		ts, err := discoveryv1.NewDiscoveryClient(conn).Tap(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Send(&discoveryv1.TapMessage{Message: &discoveryv1.TapMessage_Hello{Hello: &discoveryv1.TapHello{Workload: workload, Instance: instance}}}); err != nil {
			t.Fatal(err)
		}
		return ts
	}
	// Neither another identity of the namespace nor another connection
	// with orders' own can take its taps.
	for _, sa := range []string{"billing", "orders"} {
		if _, err := open(m.grpcConn("shipping", sa), "orders", "o1").Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("a tap stream for orders' instance from another connection (%s): %v, want PermissionDenied", sa, err)
		}
	}
	ts := open(orders.conn, "orders", "o1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var events <-chan push.TapEvent
	waitFor(t, "the tap stream to register", func() bool {
		var err error
		events, _, err = m.cp.push.StartTap(ctx, "shipping/orders", push.TapFilter{Method: "GET"})
		return err == nil
	})
	req, err := ts.Recv()
	if err != nil || req.GetMethod() != "GET" || req.GetStop() {
		t.Fatalf("tap request: %v %v", req, err)
	}
	for _, id := range []uint64{req.GetId() + 100, req.GetId()} { // a tap it was not sent is dropped
		if err := ts.Send(&discoveryv1.TapMessage{Message: &discoveryv1.TapMessage_Event{Event: &discoveryv1.TapEvent{TapId: id, Path: fmt.Sprint(id)}}}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case ev := <-events:
		if ev.GetPath() != fmt.Sprint(req.GetId()) || ev.Instance != "shipping/orders/o1" {
			t.Fatalf("event %+v", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no tap event")
	}
	cancel()
	if req, err := ts.Recv(); err != nil || !req.GetStop() {
		t.Fatalf("after the tap ended: %v %v, want a stop", req, err)
	}
}

// TestForwarder: the dashboard's loopback forwarder answers the browser
// that came with the printed key, the dashboard's own pages only, reads
// only, and adds the credential itself.
func TestForwarder(t *testing.T) {
	m := startMesh(t, "")
	c, err := Dial(m.cfg.StateDir, "")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(c.Forwarder("k3y"))
	defer srv.Close()
	do := func(method, path string, h map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultTransport.RoundTrip(req) // no redirects followed
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	login := do("GET", "/?key=k3y", nil)
	cookie := login.Header.Get("Set-Cookie")
	if login.StatusCode != http.StatusFound || !strings.Contains(cookie, "HttpOnly") || !strings.Contains(cookie, "SameSite=Strict") {
		t.Fatalf("login: %d %q", login.StatusCode, cookie)
	}
	withCookie := map[string]string{"Cookie": "trellis-dashboard=k3y"}
	for _, tc := range []struct {
		method, path string
		h            map[string]string
		want         int
	}{
		{"GET", "/api/v1/status", withCookie, http.StatusOK},
		{"GET", "/dashboard/", withCookie, http.StatusOK},
		{"GET", "/api/v1/status", nil, http.StatusForbidden},
		{"GET", "/?key=wrong", nil, http.StatusForbidden},
		{"GET", "/api/v1/status", map[string]string{"Cookie": "trellis-dashboard=k3y", "Sec-Fetch-Site": "cross-site"}, http.StatusForbidden},
		{"GET", "/api/v1/status", map[string]string{"Cookie": "trellis-dashboard=k3y", "Origin": "http://evil.example"}, http.StatusForbidden},
		{"POST", "/api/v1/sync", withCookie, http.StatusMethodNotAllowed},
		{"GET", "/api/v1/sync", withCookie, http.StatusNotFound},
	} {
		if got := do(tc.method, tc.path, tc.h).StatusCode; got != tc.want {
			t.Errorf("%s %s %v = %d, want %d", tc.method, tc.path, tc.h, got, tc.want)
		}
	}
}
