package telemetry

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	checkout = "spiffe://cluster.local/ns/default/sa/checkout"
	orders   = "spiffe://cluster.local/ns/shipping/sa/orders"
)

// exposition renders a proxy's metrics the way its /metrics does, with
// ok/fail HTTP requests from checkout (mTLS) and from a plaintext caller,
// latencies all in the (5ms, 10ms] bucket, TCP connections, and a
// passthrough request.
func exposition(start float64, ok, fail, plain, denied, tcp, open int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %g\n", start)
	b.WriteString("# TYPE trellis_requests_total counter\n")
	req := func(dir, src, dst, tls, decision, class string, n int) {
		fmt.Fprintf(&b, "trellis_requests_total{decision=%q,destination=%q,direction=%q,policy=\"\",source=%q,status_class=%q,tls=%q} %d\n", decision, dst, dir, src, class, tls, n)
	}
	req("inbound", checkout, orders, "true", "allow", "2xx", ok)
	req("inbound", checkout, orders, "true", "allow", "5xx", fail)
	req("inbound", "unknown", orders, "false", "allow", "2xx", plain)
	req("inbound", checkout, orders, "true", "deny", "4xx", denied)
	req("outbound", orders, "passthrough", "false", "", "2xx", ok)
	b.WriteString("# TYPE trellis_request_duration_seconds histogram\n")
	total := ok + fail + denied
	for _, le := range []string{"0.001", "0.005"} {
		fmt.Fprintf(&b, "trellis_request_duration_seconds_bucket{destination=%q,direction=\"inbound\",source=%q,tls=\"true\",le=%q} 0\n", orders, checkout, le)
	}
	for _, le := range []string{"0.01", "+Inf"} {
		fmt.Fprintf(&b, "trellis_request_duration_seconds_bucket{destination=%q,direction=\"inbound\",source=%q,tls=\"true\",le=%q} %d\n", orders, checkout, le, total)
	}
	fmt.Fprintf(&b, "trellis_request_duration_seconds_sum{destination=%q,direction=\"inbound\",source=%q,tls=\"true\"} 0\n", orders, checkout)
	fmt.Fprintf(&b, "trellis_request_duration_seconds_count{destination=%q,direction=\"inbound\",source=%q,tls=\"true\"} %d\n", orders, checkout, total)
	b.WriteString("# TYPE trellis_tcp_connections_total counter\n")
	fmt.Fprintf(&b, "trellis_tcp_connections_total{decision=\"allow\",destination=%q,direction=\"inbound\",policy=\"\",source=%q,tls=\"true\"} %d\n", orders, checkout, tcp)
	b.WriteString("# TYPE trellis_tcp_open_connections gauge\n")
	fmt.Fprintf(&b, "trellis_tcp_open_connections{destination=%q,direction=\"inbound\",source=%q,tls=\"true\"} %d\n", orders, checkout, open)
	return b.String()
}

func mustParse(t *testing.T, text string, at time.Time) *snapshot {
	t.Helper()
	s, err := parseSnapshot(strings.NewReader(text), at)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestParseSnapshot(t *testing.T) {
	s := mustParse(t, exposition(1000, 10, 2, 3, 1, 4, 1), time.Unix(2000, 0))
	if s.start != 1000 {
		t.Errorf("start = %v", s.start)
	}
	in := Edge{Direction: "inbound", Source: checkout, Destination: orders, TLS: true}
	if got := s.requests[requestKey{in, "allow", "", "5xx"}]; got != 2 {
		t.Errorf("5xx = %v", got)
	}
	if got := s.conns[connKey{in, "allow", ""}]; got != 4 {
		t.Errorf("tcp = %v", got)
	}
	if h := s.latency[in]; len(h.counts) != 4 || h.counts[3] != 13 {
		t.Errorf("histogram = %v", h)
	}
}

// TestRuleDecisions: decisions by policy rule become one row per rule,
// enforced before dry-run, the decisions no policy made first.
func TestRuleDecisions(t *testing.T) {
	text := `# TYPE trellis_authz_decisions_total counter
trellis_authz_decisions_total{decision="allow",dry_run="false",policy="ns/p",rule="10"} 4
trellis_authz_decisions_total{decision="allow",dry_run="false",policy="ns/p",rule="2"} 3
trellis_authz_decisions_total{decision="deny",dry_run="true",policy="ns/p",rule="2"} 1
trellis_authz_decisions_total{decision="deny",dry_run="false",policy="",rule=""} 5
`
	s := mustParse(t, text, time.Unix(0, 0))
	got := fmt.Sprint(ruleList(s.rules))
	want := "[{  false 0 5} {ns/p 2 false 3 0} {ns/p 2 true 0 1} {ns/p 10 false 4 0}]"
	if got != want {
		t.Fatalf("rows = %s, want %s", got, want)
	}
}

func TestParseSnapshotRefusesBadInput(t *testing.T) {
	for name, text := range map[string]string{
		"not metrics": "<html>\n",
		"negative":    "# TYPE trellis_requests_total counter\ntrellis_requests_total{direction=\"inbound\"} -1\n",
		"too large":   "# TYPE x counter\n" + strings.Repeat("x 1\n", maxScrapeBytes/4+1),
	} {
		s, err := parseSnapshot(strings.NewReader(text), time.Now())
		if name == "negative" {
			// Parsed, but the bad sample is dropped.
			if err != nil || len(s.requests) != 0 {
				t.Errorf("%s: %v %v", name, s, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestQuantile(t *testing.T) {
	inf := math.Inf(1)
	h := histogram{bounds: []float64{0.001, 0.005, 0.01, inf}, counts: []float64{0, 50, 100, 100}}
	for _, tc := range []struct {
		q, want float64
	}{{0.25, 0.003}, {0.5, 0.005}, {0.75, 0.0075}, {0.99, 0.0099}} {
		if got, ok := h.quantile(tc.q); !ok || math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("q%v = %v, want %v", tc.q, got, tc.want)
		}
	}
	// In +Inf: the highest finite bound, as Prometheus answers.
	tail := histogram{bounds: []float64{0.001, inf}, counts: []float64{1, 10}}
	if got, _ := tail.quantile(0.99); got != 0.001 {
		t.Errorf("q99 in +Inf = %v", got)
	}
	if _, ok := (histogram{bounds: []float64{inf}, counts: []float64{0}}).quantile(0.5); ok {
		t.Error("a quantile of no observations")
	}
}

// TestTrafficWindows: rates over the window use the last scrape at or
// before its start; a proxy that started within the window counts from
// zero; a restart discards the older process's counters.
func TestTrafficWindows(t *testing.T) {
	at := func(s int64) time.Time { return time.Unix(s, 0) }
	in := Edge{Direction: "inbound", Source: checkout, Destination: orders, TLS: true}
	ok := requestKey{in, "allow", "", "2xx"}
	for _, tc := range []struct {
		name   string
		snaps  []*snapshot
		now    int64
		window time.Duration
		rate   float64 // of ok requests; -1 for no answer
	}{
		{"one scrape of an old proxy", []*snapshot{{at: at(1000), start: 1, requests: map[requestKey]float64{ok: 50}}}, 1000, time.Minute, -1},
		{"started within the window", []*snapshot{{at: at(1000), start: 990, requests: map[requestKey]float64{ok: 50}}}, 1000, time.Minute, 5},
		{"baseline before the window", []*snapshot{
			{at: at(900), start: 1, requests: map[requestKey]float64{ok: 10}},
			{at: at(930), start: 1, requests: map[requestKey]float64{ok: 40}},
			{at: at(1000), start: 1, requests: map[requestKey]float64{ok: 110}},
		}, 1000, time.Minute, 1},
		{"oldest after the window start", []*snapshot{
			{at: at(980), start: 1, requests: map[requestKey]float64{ok: 10}},
			{at: at(1000), start: 1, requests: map[requestKey]float64{ok: 30}},
		}, 1000, time.Minute, 1},
		{"restart", []*snapshot{
			{at: at(950), start: 1, requests: map[requestKey]float64{ok: 1000}},
			{at: at(1000), start: 980, requests: map[requestKey]float64{ok: 40}},
		}, 1000, time.Minute, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, s := range tc.snaps {
				if s.conns == nil {
					s.conns, s.open, s.latency = map[connKey]float64{}, map[Edge]float64{}, map[Edge]histogram{}
				}
			}
			h := &history{snaps: tc.snaps}
			tr, got := h.traffic(at(tc.now), tc.window)
			if tc.rate < 0 {
				if got {
					t.Fatalf("answered %v", tr.requests)
				}
				return
			}
			if !got {
				t.Fatal("no answer")
			}
			if r := tr.requests[ok] / tr.seconds; math.Abs(r-tc.rate) > 1e-9 {
				t.Fatalf("rate = %v, want %v", r, tc.rate)
			}
		})
	}
}

// TestCollectorWindow scrapes a proxy's real HTTP endpoint twice, with
// traffic in between, and checks the golden metrics and edges.
func TestCollectorWindow(t *testing.T) {
	var mu sync.Mutex
	body := exposition(1, 0, 0, 0, 0, 0, 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		_, _ = w.Write([]byte(body))
	}))
	defer srv.Close()
	now := time.Unix(10_000, 0)
	c := New(Config{
		Targets: func() []Target {
			return []Target{{Instance: "shipping/orders/o1", Workload: "shipping/orders", Identity: orders, Addr: strings.TrimPrefix(srv.URL, "http://")}}
		},
		Now: func() time.Time { return now },
	})
	c.Scrape(context.Background())
	mu.Lock()
	body = exposition(1, 80, 20, 10, 10, 5, 2)
	mu.Unlock()
	now = now.Add(10 * time.Second)
	c.Scrape(context.Background())

	wl, edges := c.Window(now, time.Minute)
	if len(wl) != 1 {
		t.Fatalf("workloads = %+v", wl)
	}
	w := wl[0]
	// 120 requests in 10s: 80 ok, 20 failed, 10 plaintext ok, 10 denied.
	if w.RequestsPerSecond != 12 || *w.SuccessRate != 100.0/120 || w.DeniedPerSecond != 1 || w.TCPConnectionsPerSecond != 0.5 || w.TCPOpenConnections != 2 {
		t.Fatalf("orders: %+v", w)
	}
	if w.Latency == nil || w.Latency.P50 <= 5 || w.Latency.P99 > 10 {
		t.Fatalf("latency %+v, want within the (5ms, 10ms] bucket", w.Latency)
	}
	var plain, secured, out bool
	for _, e := range edges {
		switch {
		case e.SourceIdentity == "unknown" && !e.MTLS && e.RequestsPerSecond == 1:
			plain = true
		case e.SourceIdentity == checkout && e.MTLS && e.DestinationWorkload == "shipping/orders" && e.RequestsPerSecond == 11:
			secured = true
		case e.DestinationIdentity == "passthrough" && e.SourceWorkload == "shipping/orders" && e.MeasuredBy == "outbound":
			out = true
		}
	}
	if !plain || !secured || !out {
		t.Fatalf("edges (plaintext %v, mTLS %v, outside %v): %+v", plain, secured, out, edges)
	}

	// Gone from the targets, gone from the answers.
	c.cfg.Targets = func() []Target { return nil }
	c.Scrape(context.Background())
	if wl, _ := c.Window(now, time.Minute); len(wl) != 0 {
		t.Fatalf("a proxy no longer connected still answers: %+v", wl)
	}
}

func FuzzParseSnapshot(f *testing.F) {
	f.Add(exposition(1, 1, 2, 3, 4, 5, 6))
	f.Add("# TYPE trellis_request_duration_seconds histogram\ntrellis_request_duration_seconds_bucket{le=\"1\"} 5\ntrellis_request_duration_seconds_bucket{le=\"0.5\"} 7\n")
	f.Add("# TYPE trellis_request_duration_seconds histogram\ntrellis_request_duration_seconds_bucket{le=\"-Inf\"} 1\ntrellis_request_duration_seconds_bucket{le=\"+Inf\"} 2\n" +
		"# TYPE trellis_requests_total counter\ntrellis_requests_total{direction=\"inbound\"} 1e308\ntrellis_requests_total{direction=\"inbound\",tls=\"true\"} 1e308\n")
	f.Fuzz(func(t *testing.T, text string) {
		s, err := parseSnapshot(strings.NewReader(text), time.Unix(0, 0))
		if err != nil {
			return
		}
		for _, h := range s.latency {
			for i := 1; i < len(h.counts); i++ {
				if h.counts[i] < h.counts[i-1] || h.bounds[i] <= h.bounds[i-1] {
					t.Fatalf("a histogram out of order was kept: %v", h)
				}
			}
			if q, ok := h.quantile(0.99); ok && (math.IsNaN(q) || math.IsInf(q, 0) || q < 0 || q > maxLatency) {
				t.Fatalf("quantile %v of %v", q, h)
			}
		}
		for _, v := range s.requests {
			if v < 0 || math.IsNaN(v) || v > maxValue {
				t.Fatalf("a request count of %v", v)
			}
		}
		// Whatever the input, the figures are JSON numbers.
		c := New(Config{Targets: func() []Target { return nil }})
		c.hist["x"] = &history{target: Target{Instance: "x", Workload: "n/w"}, snaps: []*snapshot{s}}
		s.start = 1
		wl, el := c.Window(time.Unix(30, 0), time.Minute)
		if _, err := json.Marshal([]any{wl, el}); err != nil {
			t.Fatalf("the figures do not encode: %v", err)
		}
	})
}

// BenchmarkParseSnapshot parses a proxy's metrics with 50 callers: what
// one scrape of one proxy costs the control plane.
func BenchmarkParseSnapshot(b *testing.B) {
	var text strings.Builder
	for line := range strings.Lines(exposition(1, 100, 2, 3, 1, 4, 1)) {
		if strings.HasPrefix(line, "#") || !strings.Contains(line, "sa/checkout") {
			text.WriteString(line)
			continue
		}
		for i := range 50 {
			text.WriteString(strings.ReplaceAll(line, "sa/checkout", fmt.Sprintf("sa/caller-%d", i)))
		}
	}
	data := text.String()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseSnapshot(strings.NewReader(data), time.Unix(0, 0)); err != nil {
			b.Fatal(err)
		}
	}
}
