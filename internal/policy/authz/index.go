package authz

// group is the rules of one kind of policy (enforced DENY, enforced ALLOW,
// …) on one workload, in evaluation order, with an index so that a request
// only evaluates the rules it could match.
//
// Most rules name their callers: every from entry requires one of a few
// exact principals, or one of a few exact namespaces. Such a rule cannot
// match a caller outside those values, so the group maps each value to the
// rules that require it. A request evaluates the rules listed under its
// principal, under its namespace, and the rules without such a key, merged
// in evaluation order, so the first match is the one a linear scan would
// find. The index only skips rules; every candidate is evaluated in full.
type group struct {
	policies    int // how many policies, including those without rules
	rules       []ruleRef
	byPrincipal map[string][]int32
	byNamespace map[string][]int32
	unkeyed     []int32
}

type ruleRef struct {
	policy *Policy
	rule   *rule
	index  int // in the policy
}

// maxIndexed bounds the index size; beyond it the group scans linearly.
const maxIndexed = 1 << 16

func newGroup(ps []*Policy) *group {
	g := &group{policies: len(ps)}
	for _, p := range ps {
		for i := range p.rules {
			g.rules = append(g.rules, ruleRef{policy: p, rule: &p.rules[i], index: i})
		}
	}
	g.byPrincipal, g.byNamespace = map[string][]int32{}, map[string][]int32{}
	entries := 0
	for n, ref := range g.rules {
		ord := int32(n)
		if vals, ok := ref.rule.key(attrPrincipal); ok {
			addKeys(g.byPrincipal, vals, ord)
			entries += len(vals)
		} else if vals, ok := ref.rule.key(attrNamespace); ok {
			addKeys(g.byNamespace, vals, ord)
			entries += len(vals)
		} else {
			g.unkeyed = append(g.unkeyed, ord)
		}
	}
	if entries > maxIndexed || len(g.unkeyed) == len(g.rules) {
		g.byPrincipal, g.byNamespace, g.unkeyed = nil, nil, nil
	}
	return g
}

func addKeys(m map[string][]int32, vals []string, ord int32) {
	for _, v := range vals {
		if l := m[v]; len(l) == 0 || l[len(l)-1] != ord {
			m[v] = append(l, ord)
		}
	}
}

// key returns the exact values of attribute a one of which any caller
// matching the rule must have, if the rule has such a requirement: in every
// from entry a positive field on a with only exact values, or such a when
// condition.
func (r *rule) key(a attr) ([]string, bool) {
	for i := range r.when {
		c := &r.when[i]
		if c.attr == a && !c.negate {
			if vals, ok := c.strs.Exact(); ok {
				return vals, true
			}
		}
	}
	if len(r.from) == 0 {
		return nil, false
	}
	var out []string
	for _, entry := range r.from {
		found := false
		for i := range entry {
			c := &entry[i]
			if c.attr != a || c.negate {
				continue
			}
			if vals, ok := c.strs.Exact(); ok {
				out = append(out, vals...)
				found = true
				break
			}
		}
		if !found {
			return nil, false
		}
	}
	return out, true
}

// first returns the first rule in evaluation order that matches, or nil.
func (g *group) first(v *view) *ruleRef {
	if g == nil {
		return nil
	}
	if g.byPrincipal == nil {
		for n := range g.rules {
			if ref := &g.rules[n]; ref.rule.matches(v, ref.policy.Action) {
				return ref
			}
		}
		return nil
	}
	var a, b []int32
	if v.Principal != "" {
		a = g.byPrincipal[v.Principal]
	}
	if v.Namespace != "" {
		b = g.byNamespace[v.Namespace]
	}
	c := g.unkeyed
	// Merge the three ascending lists; a rule is in at most one of them.
	for len(a)+len(b)+len(c) > 0 {
		next, from := int32(1<<31-1), 0
		if len(a) > 0 && a[0] < next {
			next, from = a[0], 1
		}
		if len(b) > 0 && b[0] < next {
			next, from = b[0], 2
		}
		if len(c) > 0 && c[0] < next {
			next, from = c[0], 3
		}
		switch from {
		case 1:
			a = a[1:]
		case 2:
			b = b[1:]
		case 3:
			c = c[1:]
		}
		if ref := &g.rules[next]; ref.rule.matches(v, ref.policy.Action) {
			return ref
		}
	}
	return nil
}
