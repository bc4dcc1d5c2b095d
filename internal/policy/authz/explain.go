package authz

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// Explanation is a decision with the evaluation of every policy that applies
// to the workload, for humans. It is built by walking the same compiled
// conditions as Evaluate, so the two cannot disagree.
type Explanation struct {
	Result Result
	// Policies are the applicable policies in evaluation order: DENY,
	// ALLOW, AUDIT, then the dry-run ones in the same order.
	Policies []PolicyTrace
}

// PolicyTrace is how one policy fared.
type PolicyTrace struct {
	Policy *Policy
	// Rule is the first matching rule, or -1.
	Rule  int
	Rules []RuleTrace
}

// RuleTrace is how one rule fared.
type RuleTrace struct {
	Index   int
	Matched bool
	// HTTPOnly lists the HTTP-only fields of an ALLOW rule that make it
	// unable to match a TCP connection; the rule was not evaluated further.
	HTTPOnly []string
	// IgnoredHTTP lists the HTTP-only fields of a DENY or AUDIT rule that
	// were treated as matching because the connection is TCP.
	IgnoredHTTP []string
	// Mismatches are the conditions that did not hold: all failing when
	// conditions, and those of the from and to entries that came closest.
	Mismatches []Mismatch
}

// Mismatch is one condition that did not hold.
type Mismatch struct {
	Field  string // in the rule, e.g. "to[0].operation.methods"
	Reason string // e.g. "method GET not in [POST]"
}

// Reason joins the rule's mismatches, or says why it could not match.
func (t *RuleTrace) Reason() string {
	if len(t.HTTPOnly) > 0 {
		return fmt.Sprintf("uses HTTP-only fields (%s), which cannot match a TCP connection", strings.Join(t.HTTPOnly, ", "))
	}
	rs := make([]string, len(t.Mismatches))
	for i, m := range t.Mismatches {
		rs[i] = m.Reason
	}
	return strings.Join(rs, "; ")
}

// Explain decides a request like Evaluate and records why.
func (e *Evaluator) Explain(r *Request) Explanation {
	var x Explanation
	v := newView(r)
	traces := make([][]PolicyTrace, 6)
	for i, group := range [][]*Policy{e.deny, e.allow, e.audit, e.dryDeny, e.dryAllow, e.dryAudit} {
		for _, p := range group {
			traces[i] = append(traces[i], p.trace(&v))
		}
		x.Policies = append(x.Policies, traces[i]...)
	}
	// The result is derived from the traces by a plain scan, independently
	// of Evaluate's index, so tests comparing the two check each other.
	res := Result{AuditRule: -1, DryRun: Shadow{Rule: -1}}
	res.Outcome, res.Policy, res.Rule = decideTraced(traces[0], nil, traces[1], nil)
	res.Allowed = res.Outcome.Allowed()
	if p, i := firstTraced(traces[2]); p != nil {
		res.Audit, res.AuditRule = p, i
	}
	if len(traces[3])+len(traces[4]) > 0 {
		s := &res.DryRun
		s.Evaluated = true
		s.Outcome, s.Policy, s.Rule = decideTraced(traces[0], traces[3], traces[1], traces[4])
		s.Allowed = s.Outcome.Allowed()
	}
	x.Result = res
	return x
}

func firstTraced(groups ...[]PolicyTrace) (*Policy, int) {
	for _, g := range groups {
		for _, t := range g {
			if t.Rule >= 0 {
				return t.Policy, t.Rule
			}
		}
	}
	return nil, -1
}

func decideTraced(deny1, deny2, allow1, allow2 []PolicyTrace) (Outcome, *Policy, int) {
	if p, i := firstTraced(deny1, deny2); p != nil {
		return DeniedByPolicy, p, i
	}
	if len(allow1)+len(allow2) == 0 {
		return AllowedNoAllowPolicy, nil, -1
	}
	if p, i := firstTraced(allow1, allow2); p != nil {
		return AllowedByPolicy, p, i
	}
	return DeniedNoMatch, nil, -1
}

// Closest returns the enforced ALLOW rule that came nearest to matching:
// the fewest failed conditions, rules that cannot match TCP last, and
// evaluation order among equals. It returns nil when there is none, as
// when every ALLOW policy has no rules.
func (x *Explanation) Closest() (*PolicyTrace, *RuleTrace) {
	var (
		bp    *PolicyTrace
		br    *RuleTrace
		score int
	)
	for i := range x.Policies {
		pt := &x.Policies[i]
		if pt.Policy.Action != policy.ActionAllow || pt.Policy.DryRun {
			continue
		}
		for j := range pt.Rules {
			rt := &pt.Rules[j]
			s := len(rt.Mismatches)
			if len(rt.HTTPOnly) > 0 {
				s = 1 << 20
			}
			if br == nil || s < score {
				bp, br, score = pt, rt, s
			}
		}
	}
	return bp, br
}

func (p *Policy) trace(v *view) PolicyTrace {
	t := PolicyTrace{Policy: p, Rule: -1}
	for i := range p.rules {
		rt := p.rules[i].trace(v, p.Action)
		rt.Index = i
		if rt.Matched && t.Rule < 0 {
			t.Rule = i
		}
		t.Rules = append(t.Rules, rt)
	}
	return t
}

func (r *rule) trace(v *view, action policy.Action) RuleTrace {
	var t RuleTrace
	if !v.HTTP && len(r.httpOnly) > 0 && action == policy.ActionAllow {
		t.HTTPOnly = r.httpOnly
		return t
	}
	if !v.HTTP {
		t.IgnoredHTTP = r.httpOnly
	}
	t.Mismatches = append(t.Mismatches, closestEntry(r.from, v)...)
	t.Mismatches = append(t.Mismatches, closestEntry(r.to, v)...)
	t.Mismatches = append(t.Mismatches, failures(r.when, v)...)
	t.Matched = len(t.Mismatches) == 0
	return t
}

// closestEntry returns the failures of the entry with the fewest, or none
// if an entry matches or there are no entries.
func closestEntry(entries [][]cond, v *view) []Mismatch {
	var best []Mismatch
	for i, cs := range entries {
		f := failures(cs, v)
		if len(f) == 0 {
			return nil
		}
		if i == 0 || len(f) < len(best) {
			best = f
		}
	}
	return best
}

func failures(cs []cond, v *view) []Mismatch {
	var out []Mismatch
	for i := range cs {
		if !cs[i].holds(v) {
			out = append(out, Mismatch{Field: cs[i].field, Reason: cs[i].why(v)})
		}
	}
	return out
}

// why explains a condition that does not hold.
func (c *cond) why(v *view) string {
	list := "[" + strings.Join(c.values, ", ") + "]"
	value, present := c.value(v)
	if c.negate {
		// Only a present value can be among the negated ones.
		return fmt.Sprintf("%s %s matches %s %s", c.label, value, c.field[strings.LastIndexByte(c.field, '.')+1:], list)
	}
	if !present {
		switch c.attr {
		case attrPrincipal, attrNamespace:
			return fmt.Sprintf("no %s (the caller is not authenticated by mTLS), required: %s", c.label, list)
		case attrIP:
			return fmt.Sprintf("%s unknown, required: %s", c.label, list)
		case attrHeader:
			return fmt.Sprintf("%s absent, required: %s", c.label, list)
		}
		return fmt.Sprintf("no %s, required: %s", c.label, list)
	}
	return fmt.Sprintf("%s %s not in %s", c.label, value, list)
}

// value renders the request's attribute for explanations.
func (c *cond) value(v *view) (string, bool) {
	var s string
	switch c.attr {
	case attrPrincipal:
		s = v.Principal
	case attrNamespace:
		s = v.Namespace
	case attrIP:
		if !v.IP.IsValid() {
			return "", false
		}
		return v.IP.String(), true
	case attrPort:
		return strconv.FormatUint(uint64(v.Port), 10), true
	case attrMethod:
		s = v.Method
	case attrPath:
		s = v.path
	case attrRawPath:
		s = v.Path
	case attrHost, attrHostHeader:
		s = v.Host
	case attrHeader:
		h, ok := headerValue(v.Headers, c.header)
		if !ok {
			return "", false
		}
		return strconv.Quote(h), true
	}
	if s == "" {
		return "", false
	}
	if strings.ContainsAny(s, " \t\"") {
		s = strconv.Quote(s)
	}
	return s, true
}

// Rules returns how many rules the policy has.
func (p *Policy) Rules() int { return len(p.rules) }
