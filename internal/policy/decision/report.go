package decision

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
)

// Report is the JSON form of a Decision, printed by `trellis policy explain
// -o json`. Users script against it: add fields, never rename or remove.
type Report struct {
	Decision       string         `json:"decision"` // "allow" or "deny"
	DeniedBy       *string        `json:"deniedBy"` // "mtls", "authorization" or null
	Reason         string         `json:"reason"`   // the text output's first line
	Workload       WorkloadReport `json:"workload"`
	Port           uint32         `json:"port"`
	Protocol       string         `json:"protocol"`
	Peer           PeerReport     `json:"peer"`
	Request        *RequestReport `json:"request"` // null for TCP
	MTLS           MTLSReport     `json:"mtls"`
	Authorization  AuthzReport    `json:"authorization"`
	Audit          []RuleReport   `json:"audit"`
	DryRun         []DryRunReport `json:"dryRun"`
	DryRunDecision *string        `json:"dryRunDecision"` // with dry-run policies enforced; null without any
	Policies       []PolicyReport `json:"policies"`
	Notes          []string       `json:"notes"`
}

// WorkloadReport identifies the workload.
type WorkloadReport struct {
	Namespace string            `json:"namespace"`
	Name      string            `json:"name"`
	Labels    map[string]string `json:"labels"`
}

// PeerReport is the caller as authorization saw it.
type PeerReport struct {
	Authenticated bool    `json:"authenticated"`
	Principal     *string `json:"principal"`
	Namespace     *string `json:"namespace"`
	IP            *string `json:"ip"`
}

// RequestReport is the HTTP request as authorization saw it.
type RequestReport struct {
	Method  string              `json:"method"`
	Path    string              `json:"path"`
	Host    string              `json:"host"`
	Headers map[string][]string `json:"headers"`
}

// MTLSReport is the PeerAuthentication outcome.
type MTLSReport struct {
	Mode     string   `json:"mode"`
	Policy   *string  `json:"policy"` // namespace/name, null for the default
	Scope    string   `json:"scope"`  // default, mesh, namespace, workload or port
	Decision string   `json:"decision"`
	Reason   string   `json:"reason"`
	Ignored  []string `json:"ignored"`
}

// AuthzReport is the authorization outcome.
type AuthzReport struct {
	Decision *string        `json:"decision"` // null when mTLS refused first
	Policy   *string        `json:"policy"`
	Rule     *int           `json:"rule"`
	Reason   string         `json:"reason"`
	Closest  *ClosestReport `json:"closest"`
}

// ClosestReport is the ALLOW rule that came nearest to matching.
type ClosestReport struct {
	Policy     string           `json:"policy"`
	Rule       int              `json:"rule"`
	Mismatches []MismatchReport `json:"mismatches"`
}

// MismatchReport is a condition that did not hold.
type MismatchReport struct {
	Field  string `json:"field"`
	Reason string `json:"reason"`
}

// RuleReport names a policy rule.
type RuleReport struct {
	Policy string `json:"policy"`
	Rule   int    `json:"rule"`
}

// DryRunReport is how a dry-run policy fared.
type DryRunReport struct {
	Policy  string `json:"policy"`
	Action  string `json:"action"`
	Matched bool   `json:"matched"`
	Rule    *int   `json:"rule"`
	Effect  string `json:"effect"`
}

// PolicyReport is one applicable AuthorizationPolicy.
type PolicyReport struct {
	Policy  string        `json:"policy"`
	Action  string        `json:"action"`
	DryRun  bool          `json:"dryRun"`
	Matched bool          `json:"matched"`
	Rule    *int          `json:"rule"`
	Rules   []RuleOutcome `json:"rules"`
}

// RuleOutcome is how one rule fared.
type RuleOutcome struct {
	Rule    int    `json:"rule"`
	Matched bool   `json:"matched"`
	Reason  string `json:"reason"` // why it did not match; "" when it did
	// IgnoredHTTPFields are HTTP-only fields a DENY or AUDIT rule treated
	// as matching on a TCP connection.
	IgnoredHTTPFields []string `json:"ignoredHttpFields,omitempty"`
}

func ptr[T any](v T) *T { return &v }

func verdict(allowed bool) string {
	if allowed {
		return "allow"
	}
	return "deny"
}

// Report builds the JSON form.
func (d *Decision) Report() Report {
	in := d.Input
	labels := in.Workload.Labels
	if labels == nil {
		labels = map[string]string{}
	}
	rep := Report{
		Decision: verdict(d.Allowed),
		Reason:   d.Summary(),
		Workload: WorkloadReport{Namespace: in.Workload.Namespace, Name: in.Workload.Name, Labels: labels},
		Port:     in.Port,
		Protocol: string(in.Protocol),
		Audit:    []RuleReport{},
		DryRun:   []DryRunReport{},
		Policies: []PolicyReport{},
		Notes:    append([]string{}, d.Notes...),
	}
	if d.DeniedBy != "" {
		rep.DeniedBy = ptr(d.DeniedBy)
	}
	rep.Peer.Authenticated = in.Peer.Authenticated
	if in.Peer.Authenticated {
		rep.Peer.Principal = ptr(in.Peer.Principal)
		if in.Peer.Namespace != "" {
			rep.Peer.Namespace = ptr(in.Peer.Namespace)
		}
	}
	if in.Peer.IP.IsValid() {
		rep.Peer.IP = ptr(in.Peer.IP.String())
	}
	if in.Protocol == HTTP {
		h := map[string][]string{}
		for k, v := range in.Request.Headers {
			h[k] = v
		}
		rep.Request = &RequestReport{Method: in.Request.Method, Path: in.Request.Path, Host: in.Request.Host, Headers: h}
	}
	m := d.MTLS
	rep.MTLS = MTLSReport{Mode: string(m.Mode), Scope: string(m.Scope), Decision: verdict(m.Admitted), Reason: m.Reason, Ignored: []string{}}
	if m.Policy != nil {
		rep.MTLS.Policy = ptr(m.Policy.Metadata.Ref())
	}
	for _, pa := range m.Ignored {
		rep.MTLS.Ignored = append(rep.MTLS.Ignored, pa.Metadata.Ref())
	}
	if d.Authz == nil {
		rep.Authorization.Reason = "not evaluated: mTLS refused the connection first"
		return rep
	}
	x := d.Authz
	res := x.Result
	rep.Authorization.Decision = ptr(verdict(res.Allowed))
	rep.Authorization.Reason = d.authzReason()
	if res.Policy != nil {
		rep.Authorization.Policy = ptr(res.Policy.Ref)
		rep.Authorization.Rule = ptr(res.Rule)
	}
	if res.Outcome == authz.DeniedNoMatch {
		if pt, rt := x.Closest(); rt != nil {
			c := &ClosestReport{Policy: pt.Policy.Ref, Rule: rt.Index, Mismatches: []MismatchReport{}}
			for _, mm := range rt.Mismatches {
				c.Mismatches = append(c.Mismatches, MismatchReport{Field: mm.Field, Reason: mm.Reason})
			}
			if len(rt.HTTPOnly) > 0 {
				c.Mismatches = append(c.Mismatches, MismatchReport{Field: strings.Join(rt.HTTPOnly, ","), Reason: rt.Reason()})
			}
			rep.Authorization.Closest = c
		}
	}
	for _, pt := range x.Policies {
		p := pt.Policy
		pr := PolicyReport{Policy: p.Ref, Action: string(p.Action), DryRun: p.DryRun, Matched: pt.Rule >= 0, Rules: []RuleOutcome{}}
		if pt.Rule >= 0 {
			pr.Rule = ptr(pt.Rule)
		}
		for _, rt := range pt.Rules {
			pr.Rules = append(pr.Rules, RuleOutcome{Rule: rt.Index, Matched: rt.Matched, Reason: rt.Reason(), IgnoredHTTPFields: rt.IgnoredHTTP})
		}
		rep.Policies = append(rep.Policies, pr)
		if p.Action == policy.ActionAudit && !p.DryRun && pt.Rule >= 0 {
			rep.Audit = append(rep.Audit, RuleReport{Policy: p.Ref, Rule: pt.Rule})
		}
		if p.DryRun {
			dr := DryRunReport{Policy: p.Ref, Action: string(p.Action), Matched: pt.Rule >= 0, Effect: dryRunEffect(p.Action, pt.Rule >= 0)}
			if pt.Rule >= 0 {
				dr.Rule = ptr(pt.Rule)
			}
			rep.DryRun = append(rep.DryRun, dr)
		}
	}
	if res.DryRun.Evaluated {
		rep.DryRunDecision = ptr(verdict(res.DryRun.Allowed))
	}
	return rep
}

func dryRunEffect(a policy.Action, matched bool) string {
	switch {
	case a == policy.ActionDeny && matched:
		return "would deny"
	case a == policy.ActionAllow && matched:
		return "would allow"
	case a == policy.ActionAudit && matched:
		return "would audit"
	case a == policy.ActionAllow:
		return "would not allow"
	}
	return "none"
}

// name renders a policy for sentences: its name alone when it lives in the
// workload's namespace, namespace/name otherwise.
func (d *Decision) name(p *authz.Policy) string {
	if p.Source.Metadata.Namespace == d.Input.Workload.Namespace {
		return p.Source.Metadata.Name
	}
	return p.Ref
}

func (d *Decision) workload() string {
	return d.Input.Workload.Namespace + "/" + d.Input.Workload.Name
}

// authzReason explains the authorization result in one sentence.
func (d *Decision) authzReason() string {
	x := d.Authz
	res := x.Result
	switch res.Outcome {
	case authz.DeniedByPolicy:
		return fmt.Sprintf("DENY policy %s rule %d matched%s", d.name(res.Policy), res.Rule, d.ignoredHTTP(res.Policy, res.Rule))
	case authz.AllowedByPolicy:
		return fmt.Sprintf("ALLOW policy %s rule %d matched", d.name(res.Policy), res.Rule)
	case authz.AllowedNoAllowPolicy:
		if len(x.Policies) == 0 {
			return fmt.Sprintf("no authorization policy applies to %s", d.workload())
		}
		return fmt.Sprintf("no DENY policy matched and no ALLOW policy applies to %s", d.workload())
	}
	s := fmt.Sprintf("no ALLOW policy on %s matched", d.workload())
	if pt, rt := x.Closest(); rt != nil {
		return s + fmt.Sprintf("; closest was %s rule %d: %s", d.name(pt.Policy), rt.Index, rt.Reason())
	}
	var empty []string
	for _, pt := range x.Policies {
		if pt.Policy.Action == policy.ActionAllow && !pt.Policy.DryRun {
			empty = append(empty, d.name(pt.Policy))
		}
	}
	return s + fmt.Sprintf("; %s %s no rules, and an ALLOW policy without rules matches nothing", strings.Join(empty, ", "), plural(len(empty), "has", "have"))
}

// ignoredHTTP notes the HTTP-only fields a DENY or AUDIT rule ignored on a
// TCP connection, since that is why such a rule can match.
func (d *Decision) ignoredHTTP(p *authz.Policy, rule int) string {
	for _, pt := range d.Authz.Policies {
		if pt.Policy == p && rule < len(pt.Rules) && len(pt.Rules[rule].IgnoredHTTP) > 0 {
			return fmt.Sprintf(" (on TCP its HTTP-only fields %s are ignored)", strings.Join(pt.Rules[rule].IgnoredHTTP, ", "))
		}
	}
	return ""
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// Summary is the one-line verdict: "allowed: …" or "denied: …".
func (d *Decision) Summary() string {
	if d.Authz == nil {
		return "denied: " + d.MTLS.Reason
	}
	if d.Allowed {
		return "allowed: " + d.authzReason()
	}
	return "denied: " + d.authzReason()
}

// WriteText writes the human explanation: the verdict, then how each layer
// decided.
func (d *Decision) WriteText(w io.Writer) error {
	var b strings.Builder
	in := d.Input
	fmt.Fprintln(&b, d.Summary())
	fmt.Fprintf(&b, "  workload:  %s", d.workload())
	if len(in.Workload.Labels) > 0 {
		keys := slices.Sorted(maps.Keys(in.Workload.Labels))
		kv := make([]string, len(keys))
		for i, k := range keys {
			kv[i] = k + "=" + in.Workload.Labels[k]
		}
		fmt.Fprintf(&b, " (%s)", strings.Join(kv, ","))
	}
	fmt.Fprintf(&b, " port %d/%s\n", in.Port, in.Protocol)
	switch {
	case in.Peer.Authenticated:
		fmt.Fprintf(&b, "  caller:    %s (mTLS)", in.Peer.Principal)
	default:
		b.WriteString("  caller:    plaintext (no client certificate)")
	}
	if in.Peer.IP.IsValid() {
		fmt.Fprintf(&b, " from %s", in.Peer.IP)
	}
	b.WriteString("\n")
	if in.Protocol == HTTP {
		fmt.Fprintf(&b, "  request:   %s %s", in.Request.Method, in.Request.Path)
		if in.Request.Host != "" {
			fmt.Fprintf(&b, " host %s", in.Request.Host)
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "  mtls:      %s: %s\n", verdict(d.MTLS.Admitted), d.MTLS.Reason)
	if d.Authz != nil {
		fmt.Fprintf(&b, "  authz:     %s: %s\n", verdict(d.Authz.Result.Allowed), d.authzReason())
		for _, pt := range d.Authz.Policies {
			p := pt.Policy
			tag := string(p.Action)
			if p.DryRun {
				tag += " (dry-run)"
			}
			switch {
			case pt.Rule >= 0:
				fmt.Fprintf(&b, "    %s %s: rule %d matched%s\n", tag, p.Ref, pt.Rule, d.ignoredHTTP(p, pt.Rule))
			case len(pt.Rules) == 0:
				fmt.Fprintf(&b, "    %s %s: no rules, matches nothing\n", tag, p.Ref)
			default:
				fmt.Fprintf(&b, "    %s %s: no rule matched\n", tag, p.Ref)
				for _, rt := range pt.Rules {
					fmt.Fprintf(&b, "      rule %d: %s\n", rt.Index, rt.Reason())
				}
			}
		}
		if s := d.Authz.Result.DryRun; s.Evaluated {
			fmt.Fprintf(&b, "  dry-run:   with dry-run policies enforced: %s", verdict(s.Allowed))
			switch {
			case s.Policy != nil:
				fmt.Fprintf(&b, " (%s %s rule %d)", s.Policy.Action, s.Policy.Ref, s.Rule)
			case s.Allowed:
				b.WriteString(" (no ALLOW policy applies)")
			default:
				b.WriteString(" (no ALLOW policy matches)")
			}
			b.WriteString("\n")
		}
		if a := d.Authz.Result.Audit; a != nil {
			fmt.Fprintf(&b, "  audit:     %s rule %d matched\n", a.Ref, d.Authz.Result.AuditRule)
		}
	}
	for _, n := range d.Notes {
		fmt.Fprintf(&b, "  note:      %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
