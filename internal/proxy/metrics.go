package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
)

// Metrics are the proxy's golden signals, labelled so that the control plane
// can draw edges: who called whom, over mTLS or not, and what authorization
// decided (with the responsible policy).
type Metrics struct {
	requests    *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	connections *prometheus.CounterVec
	open        *prometheus.GaugeVec
	bytes       *prometheus.CounterVec
	refused     *prometheus.CounterVec
	dryRun      *prometheus.CounterVec
	rules       *prometheus.CounterVec
}

// Label names.
var (
	edgeLabels     = []string{"direction", "source", "destination", "tls"}
	decisionLabels = []string{"decision", "policy"}
)

func labels(extra ...[]string) []string {
	var out []string
	for _, e := range extra {
		out = append(out, e...)
	}
	return out
}

// NewMetrics registers the proxy's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: meshmetrics.Requests,
			Help: "HTTP requests handled, by edge, authorization decision and response status class.",
		}, labels(edgeLabels, decisionLabels, []string{"status_class"})),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    meshmetrics.RequestDuration,
			Help:    "Time from the request arriving at the proxy to the response headers leaving it.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, edgeLabels),
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: meshmetrics.TCPConnections,
			Help: "Opaque TCP connections handled, by edge and authorization decision.",
		}, labels(edgeLabels, decisionLabels)),
		open: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: meshmetrics.TCPOpen,
			Help: "Opaque TCP connections open now.",
		}, edgeLabels),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: meshmetrics.TCPBytes,
			Help: "Bytes relayed on opaque TCP connections; flow is 'received' (from the caller) or 'sent' (to the caller).",
		}, labels(edgeLabels, []string{"flow"})),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: meshmetrics.Refused,
			Help: "Connections refused before any request, by reason (plaintext on a STRICT port, bad certificate, not TLS, timeout…).",
		}, []string{"direction", "reason"}),
		dryRun: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: meshmetrics.DryRun,
			Help: "Requests and connections whose decision a dry-run policy would have changed, by policy and would-be decision.",
		}, []string{"policy", "would_be"}),
	}
	m.rules = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: meshmetrics.AuthzDecisions,
		Help: "Authorization decisions by the policy and rule that made them (empty: none did); dry_run=\"true\" counts what dry-run policies would have decided.",
	}, []string{"policy", "rule", "decision", "dry_run"})
	reg.MustRegister(m.requests, m.duration, m.connections, m.open, m.bytes, m.refused, m.dryRun, m.rules)
	return m
}

func statusClass(code int) string {
	switch {
	case code < 200:
		return "1xx"
	case code < 300:
		return "2xx"
	case code < 400:
		return "3xx"
	case code < 500:
		return "4xx"
	default:
		return "5xx"
	}
}
