package telemetry

import (
	"cmp"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
)

// traffic is one proxy's traffic over a window: what its counters grew by,
// over how many seconds, and its open connections now.
type traffic struct {
	target   Target
	seconds  float64
	requests map[requestKey]float64
	latency  map[Edge]histogram
	conns    map[connKey]float64
	open     map[Edge]float64
	refused  map[refusedKey]float64
	rules    map[ruleKey]float64
}

// traffic returns the proxy's traffic over the window d before now: from
// the last scrape at or before its start (or the oldest one after it) to
// the newest. A proxy that started within the window counted everything
// in it, so its baseline is zero at its start. ok is false while there is
// no interval to measure (one scrape of a proxy older than the window).
func (h *history) traffic(now time.Time, d time.Duration) (t *traffic, ok bool) {
	if len(h.snaps) == 0 {
		return nil, false
	}
	last := h.snaps[len(h.snaps)-1]
	from := now.Add(-d)
	var base *snapshot
	for _, s := range h.snaps[:len(h.snaps)-1] {
		if s.start != last.start {
			continue // counted by an earlier process of the proxy
		}
		if !s.at.After(from) || base == nil {
			base = s
		}
		if s.at.After(from) {
			break
		}
	}
	if last.start > 0 {
		started := time.Unix(0, int64(last.start*float64(time.Second)))
		if started.After(from) && (base == nil || base.at.After(started)) {
			base = &snapshot{at: started}
		}
	}
	if base == nil {
		return nil, false
	}
	secs := last.at.Sub(base.at).Seconds()
	if secs <= 0 {
		return nil, false
	}
	t = &traffic{target: h.target, seconds: secs, requests: map[requestKey]float64{}, latency: map[Edge]histogram{},
		conns: map[connKey]float64{}, open: last.open, refused: map[refusedKey]float64{}}
	for k, v := range last.refused {
		t.refused[k] = max(0, v-base.refused[k])
	}
	t.rules = map[ruleKey]float64{}
	for k, v := range last.rules {
		t.rules[k] = max(0, v-base.rules[k])
	}
	for k, v := range last.requests {
		t.requests[k] = max(0, v-base.requests[k])
	}
	for k, v := range last.conns {
		t.conns[k] = max(0, v-base.conns[k])
	}
	for k, v := range last.latency {
		t.latency[k] = v.sub(base.latency[k])
	}
	return t, true
}

// Latency holds latency percentiles in milliseconds.
type Latency struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
}

// Golden are the golden metrics of some traffic over a window.
type Golden struct {
	RequestsPerSecond float64 `json:"requestsPerSecond"`
	// SuccessRate is the share of requests answered without a 5xx; nil
	// without requests.
	SuccessRate *float64 `json:"successRate,omitempty"`
	// DeniedPerSecond counts requests and connections authorization
	// refused (HTTP 403, closed TCP).
	DeniedPerSecond float64 `json:"deniedPerSecond"`
	// Latency is measured at the proxy that answered; nil without
	// requests.
	Latency                 *Latency `json:"latencyMs,omitempty"`
	TCPConnectionsPerSecond float64  `json:"tcpConnectionsPerSecond"`
	TCPOpenConnections      float64  `json:"tcpOpenConnections"`
	// Decisions are authorization's, by the policy that decided.
	Decisions []PolicyDecisions `json:"decisions,omitempty"`
}

// PolicyDecisions counts what one policy decided, per second, requests
// and TCP connections together. Policy is "namespace/name"; "" when no
// policy decided (allowed with no ALLOW policy in force, or denied because
// none matched); "mtls" for plaintext refused by the port's mode after the
// connection was accepted.
type PolicyDecisions struct {
	Policy           string  `json:"policy"`
	AllowedPerSecond float64 `json:"allowedPerSecond"`
	DeniedPerSecond  float64 `json:"deniedPerSecond"`
}

// golden accumulates Golden from counter increases.
type golden struct {
	requests, failures, denied, conns, open float64
	hist                                    histogram
	byPolicy                                map[string]*PolicyDecisions
}

func (g *golden) request(k requestKey, n float64) {
	g.requests += n
	if k.class == "5xx" {
		g.failures += n
	}
	g.decided(k.decision, k.policy, n)
}

func (g *golden) conn(k connKey, n float64) {
	g.conns += n
	g.decided(k.decision, k.policy, n)
}

// decided counts an inbound decision (outbound series have none).
func (g *golden) decided(decision, policy string, n float64) {
	if decision != "allow" && decision != "deny" || n == 0 {
		return
	}
	if g.byPolicy == nil {
		g.byPolicy = map[string]*PolicyDecisions{}
	}
	d := g.byPolicy[policy]
	if d == nil {
		d = &PolicyDecisions{Policy: policy}
		g.byPolicy[policy] = d
	}
	if decision == "deny" {
		g.denied += n
		d.DeniedPerSecond += n
	} else {
		d.AllowedPerSecond += n
	}
}

func (g *golden) result(seconds float64) Golden {
	out := Golden{RequestsPerSecond: g.requests / seconds, DeniedPerSecond: g.denied / seconds,
		TCPConnectionsPerSecond: g.conns / seconds, TCPOpenConnections: g.open}
	if g.requests > 0 {
		sr := 1 - g.failures/g.requests
		out.SuccessRate = &sr
	}
	for _, p := range slices.Sorted(maps.Keys(g.byPolicy)) {
		out.Decisions = append(out.Decisions, *g.byPolicy[p])
	}
	p50, ok50 := g.hist.quantile(0.50)
	p95, _ := g.hist.quantile(0.95)
	p99, _ := g.hist.quantile(0.99)
	if ok50 {
		out.Latency = &Latency{P50: p50 * 1000, P95: p95 * 1000, P99: p99 * 1000}
	}
	return out
}

// WorkloadTraffic is a workload's inbound traffic, as its proxies saw it.
type WorkloadTraffic struct {
	Workload string `json:"workload"`
	// Proxies is how many of its proxies the figures come from.
	Proxies int `json:"proxies"`
	// Seconds is the span measured (shorter than the window for proxies
	// that started within it).
	Seconds float64 `json:"seconds"`
	Golden
	// Refused counts, by reason, the connections its proxies refused
	// before any request (plaintext on a STRICT port, a bad certificate…),
	// per second.
	Refused map[string]float64 `json:"refusedPerSecond,omitempty"`
	// Rules count authorization's decisions over the window by the policy
	// rule that made them, dry-run policies' would-be decisions apart.
	Rules []RuleDecisions `json:"rules,omitempty"`
}

// RuleDecisions is how many requests and connections one policy rule
// allowed and denied over a window. Policy and Rule are empty for the
// decisions no policy made (no ALLOW policy in force, or none matched).
type RuleDecisions struct {
	Policy  string  `json:"policy"`
	Rule    string  `json:"rule"`
	DryRun  bool    `json:"dryRun"`
	Allowed float64 `json:"allowed"`
	Denied  float64 `json:"denied"`
}

// EdgeTraffic is the traffic of one caller → callee pair. Inbound edges
// are measured by the callee's proxy (the caller is an identity, "unknown"
// when it came in plaintext); outbound edges by the caller's, for
// destinations outside the mesh ("passthrough", or a ServiceEntry host).
type EdgeTraffic struct {
	// SourceIdentity is the caller's SPIFFE ID, "unknown" for plaintext.
	SourceIdentity string `json:"sourceIdentity"`
	// SourceWorkload is known when the caller's proxy measured the edge.
	SourceWorkload string `json:"sourceWorkload,omitempty"`
	// DestinationIdentity is the callee's SPIFFE ID, or "passthrough".
	DestinationIdentity string `json:"destinationIdentity"`
	// DestinationWorkload is known when the callee's proxy measured it.
	DestinationWorkload string  `json:"destinationWorkload,omitempty"`
	MTLS                bool    `json:"mtls"`
	MeasuredBy          string  `json:"measuredBy"` // "inbound" or "outbound"
	Seconds             float64 `json:"seconds"`
	Golden
}

// Window returns the traffic of the last d before now: each workload's
// inbound golden metrics, and every edge.
func (c *Collector) Window(now time.Time, d time.Duration) ([]WorkloadTraffic, []EdgeTraffic) {
	c.mu.Lock()
	var all []*traffic
	for _, k := range slices.Sorted(maps.Keys(c.hist)) {
		if t, ok := c.hist[k].traffic(now, d); ok {
			all = append(all, t)
		}
	}
	c.mu.Unlock()

	type wacc struct {
		golden
		proxies int
		seconds float64
		refused map[string]float64
		rules   map[ruleKey]float64
	}
	workloads := map[string]*wacc{}
	type ekey struct {
		src, srcWorkload, dst, dstWorkload string
		tls                                bool
		by                                 string
	}
	edges := map[ekey]*wacc{}
	for _, t := range all {
		w := workloads[t.target.Workload]
		if w == nil {
			w = &wacc{}
			workloads[t.target.Workload] = w
		}
		w.proxies++
		w.seconds = max(w.seconds, t.seconds)
		for k, n := range t.rules {
			if n > 0 {
				if w.rules == nil {
					w.rules = map[ruleKey]float64{}
				}
				w.rules[k] += n
			}
		}
		for k, n := range t.refused {
			if k.direction == "inbound" && n > 0 {
				if w.refused == nil {
					w.refused = map[string]float64{}
				}
				w.refused[k.reason] += n / t.seconds
			}
		}
		edgeOf := func(e Edge) (ekey, bool) {
			switch {
			case e.Direction == "inbound":
				return ekey{src: e.Source, dst: t.target.Identity, dstWorkload: t.target.Workload, tls: e.TLS, by: "inbound"}, true
			case e.Direction == "outbound" && e.Destination != meshmetrics.Unreachable && !strings.HasPrefix(e.Destination, "spiffe://"):
				// Outside the mesh: passed through, or a ServiceEntry host.
				return ekey{src: t.target.Identity, srcWorkload: t.target.Workload, dst: e.Destination, tls: e.TLS, by: "outbound"}, true
			}
			return ekey{}, false
		}
		edge := func(e Edge) *wacc {
			k, ok := edgeOf(e)
			if !ok {
				return nil
			}
			a := edges[k]
			if a == nil {
				a = &wacc{}
				edges[k] = a
			}
			a.seconds = max(a.seconds, t.seconds)
			return a
		}
		// Rates are summed per proxy (each over its own span), so a
		// workload's rate is the sum of its proxies'.
		for k, n := range t.requests {
			if k.Direction == "inbound" {
				w.request(k, n/t.seconds)
			}
			if a := edge(k.Edge); a != nil {
				a.request(k, n/t.seconds)
			}
		}
		for k, n := range t.conns {
			if k.Direction == "inbound" {
				w.conn(k, n/t.seconds)
			}
			if a := edge(k.Edge); a != nil {
				a.conn(k, n/t.seconds)
			}
		}
		for e, n := range t.open {
			if e.Direction == "inbound" {
				w.open += n
			}
			if a := edge(e); a != nil {
				a.open += n
			}
		}
		for e, h := range t.latency {
			if e.Direction == "inbound" {
				w.hist.add(h)
			}
			if a := edge(e); a != nil {
				a.hist.add(h)
			}
		}
	}
	var wl []WorkloadTraffic
	for _, name := range slices.Sorted(maps.Keys(workloads)) {
		w := workloads[name]
		wl = append(wl, WorkloadTraffic{Workload: name, Proxies: w.proxies, Seconds: w.seconds, Golden: w.result(1), Refused: w.refused, Rules: ruleList(w.rules)})
	}
	var el []EdgeTraffic
	for k, a := range edges {
		if a.requests == 0 && a.conns == 0 && a.open == 0 {
			continue // a series that saw nothing in the window
		}
		el = append(el, EdgeTraffic{SourceIdentity: k.src, SourceWorkload: k.srcWorkload, DestinationIdentity: k.dst, DestinationWorkload: k.dstWorkload,
			MTLS: k.tls, MeasuredBy: k.by, Seconds: a.seconds, Golden: a.result(1)})
	}
	slices.SortFunc(el, func(a, b EdgeTraffic) int {
		return cmp.Or(cmp.Compare(a.DestinationIdentity, b.DestinationIdentity), cmp.Compare(a.SourceIdentity, b.SourceIdentity),
			cmp.Compare(a.DestinationWorkload, b.DestinationWorkload), cmp.Compare(a.SourceWorkload, b.SourceWorkload), cmp.Compare(a.MeasuredBy, b.MeasuredBy))
	})
	return wl, el
}

// ruleList turns decision counts into rows, one per policy rule.
func ruleList(counts map[ruleKey]float64) []RuleDecisions {
	type row struct {
		policy, rule string
		dryRun       bool
	}
	rows := map[row]*RuleDecisions{}
	for k, n := range counts {
		r := row{k.policy, k.rule, k.dryRun}
		d := rows[r]
		if d == nil {
			d = &RuleDecisions{Policy: k.policy, Rule: k.rule, DryRun: k.dryRun}
			rows[r] = d
		}
		if k.decision == "allow" {
			d.Allowed += n
		} else {
			d.Denied += n
		}
	}
	out := make([]RuleDecisions, 0, len(rows))
	for _, d := range rows {
		out = append(out, *d)
	}
	slices.SortFunc(out, func(a, b RuleDecisions) int {
		return cmp.Or(cmp.Compare(a.Policy, b.Policy), cmp.Compare(len(a.Rule), len(b.Rule)), cmp.Compare(a.Rule, b.Rule), boolCompare(a.DryRun, b.DryRun))
	})
	return out
}

func boolCompare(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}
