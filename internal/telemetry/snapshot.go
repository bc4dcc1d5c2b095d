// Package telemetry is the control plane's view of the mesh's traffic: it
// scrapes every connected proxy's metrics (the Prometheus text its stats
// listener serves), keeps a short history of each, and answers with golden
// metrics — requests per second, success rate, latency percentiles, TCP
// connections — per workload and per edge (caller → callee, mTLS or
// plaintext) over a window. No Prometheus is needed; a real one can scrape
// the same endpoints.
package telemetry

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
)

// The proxy's metric names (internal/proxy/metrics.go; docs/metrics.md).
const (
	metricRequests    = meshmetrics.Requests
	metricDuration    = meshmetrics.RequestDuration
	metricConnections = meshmetrics.TCPConnections
	metricOpen        = meshmetrics.TCPOpen
	metricRefused     = meshmetrics.Refused
	metricRules       = meshmetrics.AuthzDecisions
	metricStart       = meshmetrics.ProcessStart
)

// Limits on what one scrape may hold: a proxy's series are bounded by the
// identities it talks to, so these are far above a healthy proxy's and
// only stop a broken (or hostile) one from filling the control plane.
const (
	maxScrapeBytes = 8 << 20
	maxSeries      = 20000
	maxBuckets     = 64
)

// Edge is one direction of traffic as a proxy labels it.
type Edge struct {
	Direction   string // "inbound" or "outbound"
	Source      string // SPIFFE ID, or "unknown" for a plaintext caller
	Destination string // SPIFFE ID, a ServiceEntry host, "passthrough" (elsewhere outside the mesh) or "unreachable"
	TLS         bool
}

// requestKey is one series of trellis_requests_total.
type requestKey struct {
	Edge
	decision, policy, class string
}

// connKey is one series of trellis_tcp_connections_total.
type connKey struct {
	Edge
	decision, policy string
}

// histogram is one series of a latency histogram: cumulative counts at
// each upper bound (ascending, +Inf last).
type histogram struct {
	bounds []float64
	counts []float64
}

// snapshot is what one scrape of one proxy returned.
type snapshot struct {
	at time.Time
	// start is when the proxy process started (0 if it did not say): a
	// counter from a process that started later is not comparable.
	start    float64
	requests map[requestKey]float64
	latency  map[Edge]histogram
	conns    map[connKey]float64
	open     map[Edge]float64
	refused  map[refusedKey]float64
	rules    map[ruleKey]float64
}

// ruleKey is one series of trellis_authz_decisions_total.
type ruleKey struct {
	policy, rule, decision string
	dryRun                 bool
}

// refusedKey is one series of trellis_refused_connections_total.
type refusedKey struct {
	direction, reason string
}

// parseSnapshot reads a proxy's metrics (Prometheus text format), keeping
// the series telemetry uses. The input is a proxy's and is checked, not
// trusted: its size, lines and buckets are bounded, only the families
// telemetry reads are parsed at all, and every value must be a finite,
// non-negative number no larger than maxValue.
func parseSnapshot(r io.Reader, at time.Time) (*snapshot, error) {
	kept, err := ourLines(r)
	if err != nil {
		return nil, err
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(kept))
	if err != nil {
		return nil, err
	}
	s := &snapshot{at: at, requests: map[requestKey]float64{}, latency: map[Edge]histogram{}, conns: map[connKey]float64{}, open: map[Edge]float64{}, refused: map[refusedKey]float64{}, rules: map[ruleKey]float64{}}
	series := 0
	for name, f := range families {
		switch name {
		case metricRequests, metricDuration, metricConnections, metricOpen, metricRefused, metricRules, metricStart:
		default:
			continue
		}
		series += len(f.GetMetric())
		if series > maxSeries {
			return nil, fmt.Errorf("more than %d series", maxSeries)
		}
		for _, m := range f.GetMetric() {
			l := labelMap(m)
			e := Edge{Direction: l["direction"], Source: l["source"], Destination: l["destination"], TLS: l["tls"] == "true"}
			switch name {
			case metricStart:
				if v, ok := value(m.GetGauge().GetValue()); ok {
					s.start = v
				}
			case metricRequests:
				if v, ok := value(m.GetCounter().GetValue()); ok {
					s.requests[requestKey{e, l["decision"], l["policy"], l["status_class"]}] += v
				}
			case metricConnections:
				if v, ok := value(m.GetCounter().GetValue()); ok {
					s.conns[connKey{e, l["decision"], l["policy"]}] += v
				}
			case metricRules:
				if v, ok := value(m.GetCounter().GetValue()); ok {
					s.rules[ruleKey{l["policy"], l["rule"], l["decision"], l["dry_run"] == "true"}] += v
				}
			case metricRefused:
				if v, ok := value(m.GetCounter().GetValue()); ok {
					s.refused[refusedKey{l["direction"], l["reason"]}] += v
				}
			case metricOpen:
				if v, ok := value(m.GetGauge().GetValue()); ok {
					s.open[e] += v
				}
			case metricDuration:
				if h, ok := parseHistogram(m.GetHistogram()); ok {
					s.latency[e] = h
				}
			}
		}
	}
	return s, nil
}

func labelMap(m *dto.Metric) map[string]string {
	out := make(map[string]string, len(m.GetLabel()))
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// maxValue bounds a sample: counts beyond 2^53 lose integer precision,
// and sums of them must stay finite.
const maxValue = 1 << 53

// maxLatency bounds a histogram's finite bucket bounds, in seconds.
const maxLatency = 1e6

// value accepts a sample that can be a counter's or gauge's reading.
func value(v float64) (float64, bool) {
	return v, !math.IsNaN(v) && v >= 0 && v <= maxValue
}

// ourLines reads at most maxScrapeBytes and keeps the lines of the
// families telemetry reads (samples, and their TYPE and HELP comments), so
// that whatever else a proxy exposes costs nothing to parse.
func ourLines(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxScrapeBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxScrapeBytes {
		return nil, fmt.Errorf("metrics larger than %d bytes", maxScrapeBytes)
	}
	var out bytes.Buffer
	lines := 0
	for line := range bytes.Lines(data) {
		name := line
		if f := bytes.Fields(line); len(f) >= 3 && f[0][0] == '#' && (bytes.Equal(f[1], []byte("TYPE")) || bytes.Equal(f[1], []byte("HELP"))) {
			name = f[2]
		} else if len(line) > 0 && line[0] == '#' {
			continue
		}
		if i := bytes.IndexAny(name, "{ \t\n"); i >= 0 {
			name = name[:i]
		}
		if !ours(string(name)) {
			continue
		}
		if lines++; lines > maxSeries {
			return nil, fmt.Errorf("more than %d lines of trellis metrics", maxSeries)
		}
		out.Write(line)
		if line[len(line)-1] != '\n' {
			out.WriteByte('\n')
		}
	}
	if lines == 0 && len(data) > 0 {
		return nil, errors.New("no Trellis metrics in the response: is this a trellis-proxy stats listener?")
	}
	return out.Bytes(), nil
}

// ours reports whether a sample name is of a family telemetry reads (a
// histogram's samples carry suffixes).
func ours(name string) bool {
	switch strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count") {
	case metricRequests, metricDuration, metricConnections, metricOpen, metricRefused, metricRules, metricStart:
		return true
	}
	return false
}

// parseHistogram keeps a histogram whose buckets ascend and whose counts
// never fall, with +Inf (the total count) last.
func parseHistogram(h *dto.Histogram) (histogram, bool) {
	b := h.GetBucket()
	if len(b) == 0 || len(b) > maxBuckets {
		return histogram{}, false
	}
	out := histogram{bounds: make([]float64, 0, len(b)+1), counts: make([]float64, 0, len(b)+1)}
	for i, bk := range b {
		ub, c := bk.GetUpperBound(), float64(bk.GetCumulativeCount())
		// Latencies: bounds above zero, finite but for a last +Inf.
		if math.IsNaN(ub) || ub <= 0 || ub > maxLatency && !(math.IsInf(ub, 1) && i == len(b)-1) || c > maxValue ||
			i > 0 && (ub <= out.bounds[i-1] || c < out.counts[i-1]) {
			return histogram{}, false
		}
		out.bounds = append(out.bounds, ub)
		out.counts = append(out.counts, c)
	}
	if total := float64(h.GetSampleCount()); !math.IsInf(out.bounds[len(out.bounds)-1], 1) {
		if total < out.counts[len(out.counts)-1] || total > maxValue {
			return histogram{}, false
		}
		out.bounds = append(out.bounds, math.Inf(1))
		out.counts = append(out.counts, total)
	}
	return out, true
}

// sub returns h - base bucket by bucket (the observations between two
// scrapes); base may be empty (a zero baseline).
func (h histogram) sub(base histogram) histogram {
	out := histogram{bounds: h.bounds, counts: make([]float64, len(h.counts))}
	copy(out.counts, h.counts)
	if len(base.counts) == len(h.counts) {
		for i := range out.counts {
			out.counts[i] = max(0, out.counts[i]-base.counts[i])
		}
	}
	return out
}

// add adds o's counts into h (same bounds) or adopts o when h is empty.
func (h *histogram) add(o histogram) {
	if len(h.counts) == 0 {
		*h = histogram{bounds: o.bounds, counts: append([]float64(nil), o.counts...)}
		return
	}
	if !slices.Equal(o.bounds, h.bounds) {
		return // another bucket layout: a proxy of another version
	}
	for i := range h.counts {
		h.counts[i] += o.counts[i]
	}
}

// quantile estimates the q-quantile (0..1) of the observations, as
// Prometheus' histogram_quantile does: linear within the bucket it falls
// in; the highest finite bound when it falls in +Inf. ok is false without
// observations.
func (h histogram) quantile(q float64) (v float64, ok bool) {
	n := len(h.counts)
	if n == 0 || h.counts[n-1] == 0 {
		return 0, false
	}
	rank := q * h.counts[n-1]
	for i, c := range h.counts {
		if c < rank {
			continue
		}
		if math.IsInf(h.bounds[i], 1) {
			if i == 0 {
				return 0, false
			}
			return h.bounds[i-1], true
		}
		lower, below := 0.0, 0.0
		if i > 0 {
			lower, below = h.bounds[i-1], h.counts[i-1]
		}
		if c == below {
			return h.bounds[i], true
		}
		return lower + (h.bounds[i]-lower)*(rank-below)/(c-below), true
	}
	return h.bounds[n-1], true
}

// String is for test failures.
func (h histogram) String() string {
	s := ""
	for i := range h.bounds {
		s += strconv.FormatFloat(h.bounds[i], 'g', -1, 64) + ":" + strconv.FormatFloat(h.counts[i], 'g', -1, 64) + " "
	}
	return s
}
