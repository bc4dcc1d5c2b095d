package policy

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"
)

// This file turns the generic tree that YAML decodes to into the typed
// resources, strictly: every key must be a field the resource has, every
// value must have the field's type. It reports every problem with its field
// path instead of stopping at the first, so that one run of `trellis policy
// check` lists everything to fix.

// decoder accumulates problems; each method decodes one shape at a path.
type decoder struct {
	errs fieldErrors
}

// field is one known key of a mapping.
type field struct {
	name   string
	decode func(path string, v any)
}

// object decodes a mapping whose keys must be in fields. Keys in
// unsupported are Istio fields Trellis does not implement yet: they get
// that message rather than "unknown field". A null value is an absent
// mapping, as in Kubernetes.
func (d *decoder) object(path string, v any, fields []field, unsupported map[string]string) {
	if v == nil {
		return
	}
	m, ok := v.(map[any]any)
	if !ok {
		d.errs.add(path, "must be a mapping, not %s", describe(v))
		return
	}
	known := make(map[string]func(string, any), len(fields))
	names := make([]string, 0, len(fields))
	for _, f := range fields {
		known[f.name] = f.decode
		names = append(names, f.name)
	}
	slices.Sort(names)
	// Visit keys in a stable order so errors are reported deterministically.
	keys := slices.SortedFunc(maps.Keys(m), func(a, b any) int {
		return strings.Compare(fmt.Sprint(a), fmt.Sprint(b))
	})
	for _, k := range keys {
		ks, ok := k.(string)
		if !ok {
			d.errs.add(path, "key %v must be a string; allowed fields: %s", k, strings.Join(names, ", "))
			continue
		}
		if dec, ok := known[ks]; ok {
			dec(child(path, ks), m[k])
			continue
		}
		if why, ok := unsupported[ks]; ok {
			d.errs.add(child(path, ks), "not supported by Trellis yet: %s", why)
			continue
		}
		msg := fmt.Sprintf("unknown field %q; allowed fields: %s", ks, strings.Join(names, ", "))
		if s := similar(ks, names); s != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", s)
		}
		d.errs.add(child(path, ks), "%s", msg)
	}
}

// similar returns the allowed name equal to name but for case, if any.
func similar(name string, allowed []string) string {
	for _, a := range allowed {
		if strings.EqualFold(a, name) {
			return a
		}
	}
	return ""
}

func (d *decoder) str(path string, v any, dst *string) {
	switch s := v.(type) {
	case nil:
	case string:
		*dst = s
	default:
		d.errs.add(path, "must be a string, not %s%s", describe(v), quoteHint(v))
	}
}

func (d *decoder) strList(path string, v any, dst *[]string) {
	if v == nil {
		return
	}
	l, ok := v.([]any)
	if !ok {
		d.errs.add(path, "must be a list of strings, not %s; write [%s]", describe(v), quoted(v))
		return
	}
	out := make([]string, 0, len(l))
	for i, e := range l {
		s, ok := e.(string)
		if !ok {
			d.errs.add(index(path, i), "must be a string, not %s%s", describe(e), quoteHint(e))
			continue
		}
		out = append(out, s)
	}
	*dst = out
}

func (d *decoder) strMap(path string, v any, dst *map[string]string) {
	if v == nil {
		return
	}
	m, ok := v.(map[any]any)
	if !ok {
		d.errs.add(path, "must be a mapping of strings to strings, not %s", describe(v))
		return
	}
	out := make(map[string]string, len(m))
	for k, e := range m {
		ks, ok := k.(string)
		if !ok {
			d.errs.add(path, "key %v must be a string%s", k, quoteHint(k))
			continue
		}
		s, ok := e.(string)
		if !ok && e != nil {
			d.errs.add(key(path, ks), "must be a string, not %s%s", describe(e), quoteHint(e))
			continue
		}
		out[ks] = s
	}
	*dst = out
}

// list decodes each element of a list with fn.
func (d *decoder) list(path string, v any, fn func(path string, i int, e any)) {
	if v == nil {
		return
	}
	l, ok := v.([]any)
	if !ok {
		d.errs.add(path, "must be a list, not %s", describe(v))
		return
	}
	for i, e := range l {
		fn(index(path, i), i, e)
	}
}

// ignore accepts any value: Kubernetes metadata the policies do not use.
func ignore(string, any) {}

func describe(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case int, int64, uint64, float64:
		return "a number"
	case []any:
		return "a list"
	case map[any]any:
		return "a mapping"
	case time.Time:
		return "a timestamp"
	}
	return fmt.Sprintf("a %T", v)
}

// quoteHint suggests quoting scalars YAML read as another type, such as
// 8080 or true, which are easy to mistake for strings.
func quoteHint(v any) string {
	switch v.(type) {
	case bool, int, int64, uint64:
		return fmt.Sprintf(`; quote it: "%v"`, v)
	case float64:
		return "; quote it so YAML reads it as a string"
	}
	return ""
}

func quoted(v any) string {
	switch v.(type) {
	case string, bool, int, int64, uint64, float64:
		return fmt.Sprintf(`"%v"`, v)
	}
	return `"..."`
}

// metadata decodes object metadata. Fields Kubernetes adds to stored objects
// are accepted and ignored so that `kubectl get -o yaml` output loads.
func (d *decoder) metadata(path string, v any, m *Metadata) {
	if v == nil {
		d.errs.add(path, "is required: set metadata.name and metadata.namespace")
		return
	}
	d.object(path, v, []field{
		{"name", func(p string, v any) { d.str(p, v, &m.Name) }},
		{"namespace", func(p string, v any) { d.str(p, v, &m.Namespace) }},
		{"labels", func(p string, v any) { d.strMap(p, v, &m.Labels) }},
		{"annotations", func(p string, v any) { d.strMap(p, v, &m.Annotations) }},
		{"creationTimestamp", func(p string, v any) { d.timestamp(p, v, &m.CreationTimestamp) }},
		{"uid", ignore},
		{"resourceVersion", ignore},
		{"generation", ignore},
		{"generateName", ignore},
		{"managedFields", ignore},
		{"finalizers", ignore},
		{"ownerReferences", ignore},
		{"selfLink", ignore},
		{"deletionTimestamp", ignore},
		{"deletionGracePeriodSeconds", ignore},
	}, nil)
}

func (d *decoder) timestamp(path string, v any, dst *time.Time) {
	switch t := v.(type) {
	case nil:
	case time.Time:
		*dst = t
	case string:
		parsed, err := time.Parse(time.RFC3339, t)
		if err != nil {
			d.errs.add(path, "must be an RFC 3339 time such as 2024-05-01T12:00:00Z, not %q", t)
			return
		}
		*dst = parsed
	default:
		d.errs.add(path, "must be an RFC 3339 time such as 2024-05-01T12:00:00Z, not %s", describe(v))
	}
}

func (d *decoder) selector(path string, v any, dst **Selector) {
	if v == nil {
		return
	}
	s := &Selector{}
	d.object(path, v, []field{
		{"matchLabels", func(p string, v any) { d.strMap(p, v, &s.MatchLabels) }},
	}, map[string]string{
		"matchExpressions": "workload selectors only support matchLabels, as in Istio",
	})
	*dst = s
}

func (d *decoder) mtls(path string, v any, dst *MTLS) {
	d.object(path, v, []field{
		{"mode", func(p string, v any) {
			var s string
			d.str(p, v, &s)
			dst.Mode = MTLSMode(s)
		}},
	}, nil)
}

func (d *decoder) peerAuthenticationSpec(path string, v any, s *PeerAuthenticationSpec) {
	d.object(path, v, []field{
		{"selector", func(p string, v any) { d.selector(p, v, &s.Selector) }},
		{"mtls", func(p string, v any) {
			if v == nil {
				return
			}
			s.MTLS = &MTLS{}
			d.mtls(p, v, s.MTLS)
		}},
		{"portLevelMtls", func(p string, v any) { d.portLevelMTLS(p, v, &s.PortLevelMTLS) }},
	}, map[string]string{
		"targetRef":  "select workloads with selector.matchLabels",
		"targetRefs": "select workloads with selector.matchLabels",
	})
}

func (d *decoder) portLevelMTLS(path string, v any, dst *map[uint32]MTLS) {
	if v == nil {
		return
	}
	m, ok := v.(map[any]any)
	if !ok {
		d.errs.add(path, "must be a mapping from port number to {mode: ...}, not %s", describe(v))
		return
	}
	out := make(map[uint32]MTLS, len(m))
	keys := slices.SortedFunc(maps.Keys(m), func(a, b any) int {
		return strings.Compare(fmt.Sprint(a), fmt.Sprint(b))
	})
	for _, k := range keys {
		port, ok := portKey(k)
		if !ok {
			d.errs.add(key(path, fmt.Sprint(k)), "key must be a port number from 1 to 65535")
			continue
		}
		var mt MTLS
		d.mtls(key(path, fmt.Sprint(port)), m[k], &mt)
		out[port] = mt
	}
	*dst = out
}

// portKey accepts a port written as a number or as a numeric string (JSON
// object keys are always strings).
func portKey(k any) (uint32, bool) {
	var n int64
	switch t := k.(type) {
	case int:
		n = int64(t)
	case int64:
		n = t
	case uint64:
		if t > math.MaxUint16 {
			return 0, false
		}
		n = int64(t)
	case string:
		p, ok := parsePort(t)
		return p, ok
	default:
		return 0, false
	}
	if n < 1 || n > math.MaxUint16 {
		return 0, false
	}
	return uint32(n), true
}

var unsupportedAuthzSpec = map[string]string{
	"provider":   "CUSTOM actions with an external authorizer are not supported yet",
	"targetRef":  "select workloads with selector.matchLabels",
	"targetRefs": "select workloads with selector.matchLabels",
}

func (d *decoder) authorizationPolicySpec(path string, v any, s *AuthorizationPolicySpec) {
	d.object(path, v, []field{
		{"selector", func(p string, v any) { d.selector(p, v, &s.Selector) }},
		{"action", func(p string, v any) {
			var a string
			d.str(p, v, &a)
			s.Action = Action(a)
		}},
		{"rules", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var r Rule
				d.rule(p, e, &r)
				s.Rules = append(s.Rules, r)
			})
		}},
	}, unsupportedAuthzSpec)
}

func (d *decoder) rule(path string, v any, r *Rule) {
	d.object(path, v, []field{
		{"from", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var f From
				d.object(p, e, []field{{"source", func(p string, v any) {
					if v == nil {
						return
					}
					f.Source = &Source{}
					d.source(p, v, f.Source)
				}}}, nil)
				r.From = append(r.From, f)
			})
		}},
		{"to", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var t To
				d.object(p, e, []field{{"operation", func(p string, v any) {
					if v == nil {
						return
					}
					t.Operation = &Operation{}
					d.operation(p, v, t.Operation)
				}}}, nil)
				r.To = append(r.To, t)
			})
		}},
		{"when", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var c Condition
				d.object(p, e, []field{
					{"key", func(p string, v any) { d.str(p, v, &c.Key) }},
					{"values", func(p string, v any) { d.strList(p, v, &c.Values) }},
					{"notValues", func(p string, v any) { d.strList(p, v, &c.NotValues) }},
				}, nil)
				r.When = append(r.When, c)
			})
		}},
	}, nil)
}

const noJWT = "request authentication (JWT) is not supported yet"

func (d *decoder) source(path string, v any, s *Source) {
	d.object(path, v, []field{
		{"principals", func(p string, v any) { d.strList(p, v, &s.Principals) }},
		{"notPrincipals", func(p string, v any) { d.strList(p, v, &s.NotPrincipals) }},
		{"namespaces", func(p string, v any) { d.strList(p, v, &s.Namespaces) }},
		{"notNamespaces", func(p string, v any) { d.strList(p, v, &s.NotNamespaces) }},
		{"ipBlocks", func(p string, v any) { d.strList(p, v, &s.IPBlocks) }},
		{"notIpBlocks", func(p string, v any) { d.strList(p, v, &s.NotIPBlocks) }},
	}, map[string]string{
		"requestPrincipals":    noJWT,
		"notRequestPrincipals": noJWT,
		"remoteIpBlocks":       "use ipBlocks (the peer address); X-Forwarded-For is not trusted yet",
		"notRemoteIpBlocks":    "use notIpBlocks (the peer address); X-Forwarded-For is not trusted yet",
		"serviceAccounts":      "use principals such as cluster.local/ns/NAMESPACE/sa/NAME",
		"notServiceAccounts":   "use notPrincipals such as cluster.local/ns/NAMESPACE/sa/NAME",
	})
}

func (d *decoder) operation(path string, v any, o *Operation) {
	d.object(path, v, []field{
		{"hosts", func(p string, v any) { d.strList(p, v, &o.Hosts) }},
		{"notHosts", func(p string, v any) { d.strList(p, v, &o.NotHosts) }},
		{"ports", func(p string, v any) { d.strList(p, v, &o.Ports) }},
		{"notPorts", func(p string, v any) { d.strList(p, v, &o.NotPorts) }},
		{"methods", func(p string, v any) { d.strList(p, v, &o.Methods) }},
		{"notMethods", func(p string, v any) { d.strList(p, v, &o.NotMethods) }},
		{"paths", func(p string, v any) { d.strList(p, v, &o.Paths) }},
		{"notPaths", func(p string, v any) { d.strList(p, v, &o.NotPaths) }},
	}, nil)
}
