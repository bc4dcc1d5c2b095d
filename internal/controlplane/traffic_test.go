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

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
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
