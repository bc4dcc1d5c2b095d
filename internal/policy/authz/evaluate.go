package authz

import (
	"net/http"
	"net/netip"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/match"
)

// Request is what authorization sees of one request or TCP connection.
type Request struct {
	// HTTP is false for a TCP connection, which has no method, path, host
	// or headers.
	HTTP bool
	// Port is the workload (destination) port.
	Port uint32
	// Principal is the peer's SPIFFE ID without "spiffe://", e.g.
	// "cluster.local/ns/default/sa/checkout"; "" when the peer is not
	// authenticated by mutual TLS.
	Principal string
	// Namespace is the peer's namespace from its principal; "" when not
	// authenticated.
	Namespace string
	// IP is the peer address; the zero Addr when unknown.
	IP      netip.Addr
	Method  string
	Path    string // as requested; the query is ignored and dot segments resolved
	Host    string
	Headers http.Header // canonical keys, as net/http keeps them
}

// Outcome says how a decision was reached.
type Outcome uint8

// The outcomes.
const (
	AllowedNoAllowPolicy Outcome = iota // no ALLOW policy applies, no DENY matched
	AllowedByPolicy                     // an ALLOW rule matched
	DeniedByPolicy                      // a DENY rule matched
	DeniedNoMatch                       // ALLOW policies apply and none matched
)

// Allowed reports whether the outcome lets the request through.
func (o Outcome) Allowed() bool { return o == AllowedNoAllowPolicy || o == AllowedByPolicy }

// String describes the outcome in a few words.
func (o Outcome) String() string {
	switch o {
	case AllowedNoAllowPolicy:
		return "allowed: no ALLOW policy applies"
	case AllowedByPolicy:
		return "allowed by an ALLOW policy"
	case DeniedByPolicy:
		return "denied by a DENY policy"
	case DeniedNoMatch:
		return "denied: no ALLOW policy matched"
	}
	return "unknown"
}

// Result is an authorization decision.
type Result struct {
	Allowed bool
	Outcome Outcome
	// Policy and Rule are the DENY or ALLOW policy and rule that decided;
	// nil and -1 when no policy did.
	Policy *Policy
	Rule   int
	// Audit is the first AUDIT policy that matched, if any, and its rule.
	Audit     *Policy
	AuditRule int
	// DryRun is the decision had the dry-run policies been enforced too.
	DryRun Shadow
}

// Shadow is the decision with dry-run policies enforced alongside the
// enforced ones; Evaluated is false when the workload has no dry-run DENY
// or ALLOW policy.
type Shadow struct {
	Evaluated bool
	Allowed   bool
	Outcome   Outcome
	Policy    *Policy
	Rule      int
}

// Evaluator decides requests to one workload. It is immutable once built,
// so any number of goroutines may use it at once; build a new one when the
// policies or the workload's labels change.
type Evaluator struct {
	// The applicable policies by kind, in evaluation order, for Explain.
	deny, allow, audit          []*Policy
	dryDeny, dryAllow, dryAudit []*Policy
	// The same, indexed for Evaluate.
	gDeny, gAllow, gAudit, gDryDeny, gDryAllow *group
}

func (e *Evaluator) index() {
	e.gDeny, e.gAllow, e.gAudit = newGroup(e.deny), newGroup(e.allow), newGroup(e.audit)
	e.gDryDeny, e.gDryAllow = newGroup(e.dryDeny), newGroup(e.dryAllow)
}

// Evaluate decides a request. It does not allocate, except to join a
// header sent several times, which Istio matches as one comma-joined value.
func (e *Evaluator) Evaluate(r *Request) Result {
	v := newView(r)
	res := Result{AuditRule: -1, DryRun: Shadow{Rule: -1}}
	res.Outcome, res.Policy, res.Rule = decide(&v, e.gDeny, nil, e.gAllow, nil)
	res.Allowed = res.Outcome.Allowed()
	if ref := e.gAudit.first(&v); ref != nil {
		res.Audit, res.AuditRule = ref.policy, ref.index
	}
	if e.gDryDeny.policies+e.gDryAllow.policies > 0 {
		s := &res.DryRun
		s.Evaluated = true
		s.Outcome, s.Policy, s.Rule = decide(&v, e.gDeny, e.gDryDeny, e.gAllow, e.gDryAllow)
		s.Allowed = s.Outcome.Allowed()
	}
	return res
}

// decide applies Istio's order to two groups of DENY and ALLOW policies
// taken together (enforced, and dry-run for the shadow decision).
func decide(v *view, deny1, deny2, allow1, allow2 *group) (Outcome, *Policy, int) {
	for _, g := range [2]*group{deny1, deny2} {
		if ref := g.first(v); ref != nil {
			return DeniedByPolicy, ref.policy, ref.index
		}
	}
	if count(allow1)+count(allow2) == 0 {
		return AllowedNoAllowPolicy, nil, -1
	}
	for _, g := range [2]*group{allow1, allow2} {
		if ref := g.first(v); ref != nil {
			return AllowedByPolicy, ref.policy, ref.index
		}
	}
	return DeniedNoMatch, nil, -1
}

func count(g *group) int {
	if g == nil {
		return 0
	}
	return g.policies
}

// view is a request with what every condition needs computed once.
type view struct {
	*Request
	path   string
	method methodSet // 0 for a non-standard method
}

func newView(r *Request) view {
	return view{Request: r, path: match.CleanPath(r.Path), method: methodBit(r.Method)}
}

func (r *rule) matches(v *view, action policy.Action) bool {
	if !v.HTTP {
		if len(r.httpOnly) > 0 && action == policy.ActionAllow {
			return false
		}
	} else if r.methods != 0 && r.methods&v.method == 0 {
		return false
	}
	return anyEntry(r.from, v) && anyEntry(r.to, v) && allHold(r.when, v)
}

// anyEntry reports whether any entry of from or to matches; no entries
// match everything.
func anyEntry(entries [][]cond, v *view) bool {
	if len(entries) == 0 {
		return true
	}
	for _, cs := range entries {
		if allHold(cs, v) {
			return true
		}
	}
	return false
}

func allHold(cs []cond, v *view) bool {
	for i := range cs {
		if !cs[i].holds(v) {
			return false
		}
	}
	return true
}

// holds reports whether the condition is satisfied. HTTP-only conditions
// hold on TCP connections: ALLOW rules with them never get here on TCP, and
// DENY and AUDIT rules ignore them (see the package comment).
func (c *cond) holds(v *view) bool {
	if c.httpOnly && !v.HTTP {
		return true
	}
	return c.test(v) != c.negate
}

// test reports whether the attribute matches any of the values.
func (c *cond) test(v *view) bool {
	switch c.attr {
	case attrPrincipal:
		return c.strs.Match(v.Principal)
	case attrNamespace:
		return c.strs.Match(v.Namespace)
	case attrIP:
		if !v.IP.IsValid() {
			return false
		}
		ip := v.IP.Unmap()
		for _, n := range c.nets {
			if n.Contains(ip) {
				return true
			}
		}
		return false
	case attrPort:
		for _, p := range c.ports {
			if p == v.Port {
				return true
			}
		}
		return false
	case attrMethod:
		return c.strs.Match(v.Method)
	case attrPath:
		if v.path == "" {
			return false
		}
		for i := range c.paths {
			if c.paths[i].Match(v.path) {
				return true
			}
		}
		return false
	case attrRawPath:
		return c.strs.Match(v.Path)
	case attrHost, attrHostHeader:
		return c.strs.Match(v.Host)
	case attrHeader:
		h, ok := headerValue(v.Headers, c.header)
		return ok && c.strs.Match(h)
	}
	return false
}

// headerValue returns a header's value; a header sent several times is
// matched as its values joined by ",", as Envoy does.
func headerValue(h http.Header, name string) (string, bool) {
	vs := h[name]
	switch len(vs) {
	case 0:
		return "", false
	case 1:
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}
