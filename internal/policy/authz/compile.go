// Package authz evaluates AuthorizationPolicies as Istio documents them
// (the "Authorization" concept page and the AuthorizationPolicy reference):
//
//   - A policy applies to the workloads of its namespace that its selector
//     matches; a policy in the root namespace applies to matching workloads
//     of every namespace.
//   - DENY policies are evaluated first: if any matches, the request is
//     denied. Then, if no ALLOW policy applies to the workload, the request
//     is allowed; if some apply, it is allowed only when one matches. AUDIT
//     policies never change the decision. (CUSTOM is rejected when loading.)
//   - A policy matches when any of its rules matches; a policy without
//     rules matches nothing, so an ALLOW policy without rules denies every
//     request and a DENY policy without rules has no effect; "rules: [{}]"
//     matches everything. In a rule, from, to and every when must match;
//     from and to match when any of their entries does; in a source or an
//     operation every field set must match, and a field matches when any of
//     its values does; notX fields match when none of their values does.
//   - On a TCP connection, HTTP-only fields (methods, paths, hosts and their
//     negations, request.headers) have nothing to match. An ALLOW rule using
//     any of them never matches, and in DENY and AUDIT rules they are
//     treated as matching, so the rule applies on its other conditions: the
//     safe direction Istio documents for TCP traffic.
//
// Policies are compiled once per change into Evaluators, one per workload,
// whose Evaluate does not allocate; Explain walks the same compiled form to
// say why.
package authz

import (
	"fmt"
	"net/netip"
	"net/textproto"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/match"
)

// Policy is a compiled AuthorizationPolicy.
type Policy struct {
	Source *policy.AuthorizationPolicy
	Ref    string // namespace/name
	Action policy.Action
	DryRun bool
	rules  []rule
}

type rule struct {
	from     [][]cond // OR of sources, each an AND of fields
	to       [][]cond // OR of operations
	when     []cond   // AND
	httpOnly []string // HTTP-only fields used anywhere in the rule
	// methods, when not zero, holds a bit for every standard method the
	// rule's operations allow: a cheap first check for HTTP requests.
	methods methodSet
}

type attr uint8

const (
	attrPrincipal attr = iota
	attrNamespace
	attrIP
	attrPort
	attrMethod
	attrPath    // paths: cleaned path, path templates
	attrRawPath // request.headers[:path]
	attrHost
	attrHostHeader // request.headers[host] and [:authority]: case-sensitive
	attrHeader
)

// cond is one field of a source or operation, or one half (values or
// notValues) of a when condition.
type cond struct {
	// Hot fields first: evaluation reads attr, the flags and one matcher.
	attr     attr
	negate   bool
	httpOnly bool
	ports    []uint32
	strs     match.Set
	paths    []match.Path
	nets     []netip.Prefix
	header   string // canonical header name for attrHeader
	// For explanations.
	field  string   // e.g. "to[0].operation.methods" or "when[1].notValues"
	label  string   // e.g. "method" or "request.headers[x-user]"
	values []string // the values as written
}

// Index is every compiled AuthorizationPolicy of a Set.
type Index struct {
	root     string
	policies []*Policy
}

// Compile compiles validated policies. root is the mesh root namespace.
func Compile(aps []*policy.AuthorizationPolicy, root string) (*Index, error) {
	x := &Index{root: root}
	for _, ap := range aps {
		p, err := compilePolicy(ap)
		if err != nil {
			return nil, fmt.Errorf("compile AuthorizationPolicy %s: %w", ap.Metadata.Ref(), err)
		}
		x.policies = append(x.policies, p)
	}
	return x, nil
}

// Policies returns every compiled policy.
func (x *Index) Policies() []*Policy { return x.policies }

// Applies reports whether p applies to the workload.
func (x *Index) Applies(p *Policy, wl policy.Workload) bool {
	ns := p.Source.Metadata.Namespace
	return (ns == wl.Namespace || ns == x.root) && p.Source.Spec.Selector.Matches(wl.Labels)
}

// ForWorkload returns the evaluator of the policies that apply to wl.
func (x *Index) ForWorkload(wl policy.Workload) *Evaluator {
	e := &Evaluator{}
	for _, p := range x.policies {
		if !x.Applies(p, wl) {
			continue
		}
		switch {
		case p.DryRun && p.Action == policy.ActionDeny:
			e.dryDeny = append(e.dryDeny, p)
		case p.DryRun && p.Action == policy.ActionAllow:
			e.dryAllow = append(e.dryAllow, p)
		case p.DryRun:
			e.dryAudit = append(e.dryAudit, p)
		case p.Action == policy.ActionDeny:
			e.deny = append(e.deny, p)
		case p.Action == policy.ActionAllow:
			e.allow = append(e.allow, p)
		default:
			e.audit = append(e.audit, p)
		}
	}
	e.index()
	return e
}

func compilePolicy(ap *policy.AuthorizationPolicy) (*Policy, error) {
	p := &Policy{
		Source: ap,
		Ref:    ap.Metadata.Ref(),
		Action: ap.Spec.EffectiveAction(),
		DryRun: ap.DryRun(),
	}
	switch p.Action {
	case policy.ActionAllow, policy.ActionDeny, policy.ActionAudit:
	default:
		return nil, fmt.Errorf("action %s is not supported", p.Action)
	}
	for i, r := range ap.Spec.Rules {
		cr, err := compileRule(r)
		if err != nil {
			return nil, fmt.Errorf("spec.rules[%d].%w", i, err)
		}
		p.rules = append(p.rules, cr)
	}
	return p, nil
}

type builder struct {
	r   *rule
	err error
}

func compileRule(r policy.Rule) (rule, error) {
	var cr rule
	b := builder{r: &cr}
	for i, f := range r.From {
		if f.Source == nil {
			return rule{}, fmt.Errorf("from[%d].source: missing", i)
		}
		s, p := f.Source, fmt.Sprintf("from[%d].source.", i)
		var cs []cond
		cs = b.strings(cs, attrPrincipal, p+"principals", "principal", s.Principals, false, false)
		cs = b.strings(cs, attrPrincipal, p+"notPrincipals", "principal", s.NotPrincipals, true, false)
		cs = b.strings(cs, attrNamespace, p+"namespaces", "namespace", s.Namespaces, false, false)
		cs = b.strings(cs, attrNamespace, p+"notNamespaces", "namespace", s.NotNamespaces, true, false)
		cs = b.nets(cs, p+"ipBlocks", "source IP", s.IPBlocks, false)
		cs = b.nets(cs, p+"notIpBlocks", "source IP", s.NotIPBlocks, true)
		cr.from = append(cr.from, cs)
	}
	for i, t := range r.To {
		if t.Operation == nil {
			return rule{}, fmt.Errorf("to[%d].operation: missing", i)
		}
		o, p := t.Operation, fmt.Sprintf("to[%d].operation.", i)
		var cs []cond
		cs = b.ports(cs, p+"ports", "port", o.Ports, false)
		cs = b.ports(cs, p+"notPorts", "port", o.NotPorts, true)
		cs = b.strings(cs, attrMethod, p+"methods", "method", o.Methods, false, true)
		cs = b.strings(cs, attrMethod, p+"notMethods", "method", o.NotMethods, true, true)
		cs = b.hosts(cs, p+"hosts", o.Hosts, false)
		cs = b.hosts(cs, p+"notHosts", o.NotHosts, true)
		cs = b.paths(cs, p+"paths", o.Paths, false)
		cs = b.paths(cs, p+"notPaths", o.NotPaths, true)
		cr.to = append(cr.to, cs)
	}
	for i, w := range r.When {
		p := fmt.Sprintf("when[%d]", i)
		cr.when = b.condition(cr.when, p, w)
	}
	cr.methods = requiredMethods(cr.to)
	return cr, b.err
}

// methodSet is a set of standard HTTP methods as bits.
type methodSet uint16

var methodBits = map[string]methodSet{
	"GET": 1 << 0, "HEAD": 1 << 1, "POST": 1 << 2, "PUT": 1 << 3, "DELETE": 1 << 4,
	"CONNECT": 1 << 5, "OPTIONS": 1 << 6, "TRACE": 1 << 7, "PATCH": 1 << 8,
}

// methodBit returns the bit of a standard method, or 0.
func methodBit(m string) methodSet {
	switch m {
	case "GET":
		return 1 << 0
	case "HEAD":
		return 1 << 1
	case "POST":
		return 1 << 2
	case "PUT":
		return 1 << 3
	case "DELETE":
		return 1 << 4
	case "CONNECT":
		return 1 << 5
	case "OPTIONS":
		return 1 << 6
	case "TRACE":
		return 1 << 7
	case "PATCH":
		return 1 << 8
	}
	return 0
}

// requiredMethods returns the methods one of which a request must use to
// match some operation, when every operation lists exact standard methods;
// otherwise 0, meaning no constraint is known.
func requiredMethods(to [][]cond) methodSet {
	var set methodSet
	if len(to) == 0 {
		return 0
	}
	for _, entry := range to {
		found := false
		for i := range entry {
			c := &entry[i]
			if c.attr != attrMethod || c.negate {
				continue
			}
			vals, ok := c.strs.Exact()
			if !ok {
				continue
			}
			var bits methodSet
			for _, v := range vals {
				b, std := methodBits[v]
				if !std {
					bits = 0
					break
				}
				bits |= b
			}
			if bits != 0 {
				set |= bits
				found = true
				break
			}
		}
		if !found {
			return 0
		}
	}
	return set
}

func (b *builder) fail(field string, err error) {
	if b.err == nil {
		b.err = fmt.Errorf("%s: %w", field, err)
	}
}

func (b *builder) add(cs []cond, c cond) []cond {
	if c.httpOnly {
		b.r.httpOnly = append(b.r.httpOnly, c.field)
	}
	return append(cs, c)
}

func (b *builder) strings(cs []cond, a attr, field, label string, values []string, negate, httpOnly bool) []cond {
	if len(values) == 0 {
		return cs
	}
	set, err := match.NewSet(values, false)
	if err != nil {
		b.fail(field, err)
		return cs
	}
	c := cond{attr: a, negate: negate, httpOnly: httpOnly, field: field, label: label, values: values, strs: set}
	return b.add(cs, c)
}

func (b *builder) hosts(cs []cond, field string, values []string, negate bool) []cond {
	if len(values) == 0 {
		return cs
	}
	set, err := match.NewSet(values, true)
	if err != nil {
		b.fail(field, err)
		return cs
	}
	c := cond{attr: attrHost, negate: negate, httpOnly: true, field: field, label: "host", values: values, strs: set}
	return b.add(cs, c)
}

func (b *builder) paths(cs []cond, field string, values []string, negate bool) []cond {
	if len(values) == 0 {
		return cs
	}
	c := cond{attr: attrPath, negate: negate, httpOnly: true, field: field, label: "path", values: values}
	for _, v := range values {
		m, err := match.ParsePath(v)
		if err != nil {
			b.fail(field, err)
			return cs
		}
		c.paths = append(c.paths, m)
	}
	return b.add(cs, c)
}

func (b *builder) ports(cs []cond, field, label string, values []string, negate bool) []cond {
	if len(values) == 0 {
		return cs
	}
	c := cond{attr: attrPort, negate: negate, field: field, label: label, values: values}
	for _, v := range values {
		n, ok := policy.ParsePort(v)
		if !ok {
			b.fail(field, fmt.Errorf("invalid port %q", v))
			return cs
		}
		c.ports = append(c.ports, n)
	}
	return b.add(cs, c)
}

func (b *builder) nets(cs []cond, field, label string, values []string, negate bool) []cond {
	if len(values) == 0 {
		return cs
	}
	c := cond{attr: attrIP, negate: negate, field: field, label: label, values: values}
	for _, v := range values {
		n, err := policy.ParseIPBlock(v)
		if err != nil {
			b.fail(field, err)
			return cs
		}
		c.nets = append(c.nets, n)
	}
	return b.add(cs, c)
}

// condition compiles a when entry into up to two conds, values and
// notValues, which must both hold.
func (b *builder) condition(cs []cond, field string, w policy.Condition) []cond {
	half := func(cs []cond, values []string, negate bool) []cond {
		f := field + ".values"
		if negate {
			f = field + ".notValues"
		}
		switch k := w.Key; {
		case k == policy.KeySourcePrincipal:
			return b.strings(cs, attrPrincipal, f, k, values, negate, false)
		case k == policy.KeySourceNamespace:
			return b.strings(cs, attrNamespace, f, k, values, negate, false)
		case k == policy.KeySourceIP:
			return b.nets(cs, f, k, values, negate)
		case k == policy.KeyDestinationPort:
			return b.ports(cs, f, k, values, negate)
		default:
			name, ok := policy.HeaderKey(k)
			if !ok {
				b.fail(field+".key", fmt.Errorf("unsupported key %q", k))
				return cs
			}
			a := attrHeader
			switch strings.ToLower(name) {
			case ":method":
				a = attrMethod
			case ":path":
				a = attrRawPath
			case ":authority", "host":
				a = attrHostHeader
			}
			n := len(cs)
			cs = b.strings(cs, a, f, k, values, negate, true)
			if len(cs) > n {
				cs[n].header = textproto.CanonicalMIMEHeaderKey(name)
			}
			return cs
		}
	}
	cs = half(cs, w.Values, false)
	return half(cs, w.NotValues, true)
}
