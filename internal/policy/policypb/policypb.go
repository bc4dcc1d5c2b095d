// Package policypb converts policy resources to and from the messages of
// the discovery API: the control plane sends the policies it loaded with
// FromSet, and a proxy turns what it receives back into a policy.Set with
// ToSet, to compile it with the same code that serves the loader's output.
//
// ToSet treats its input as untrusted. It validates every resource again
// with the loader's own validation, because the compilers assume validated
// input and the control plane may run another version, or have a bug; a
// proxy should reject (NACK) an update rather than run a policy no file
// could have expressed.
//
// The conversion keeps what evaluation depends on. What it drops:
//   - apiVersion: every accepted alias means the same, so ToSet sets
//     policy.APIVersion;
//   - the Location, sent as readable text (Metadata.source) that comes back
//     whole in Location.File, since it is only used in messages;
//   - the difference between "mtls: {}" and no mtls, and between empty and
//     absent lists and maps, which evaluation treats alike;
//   - creation times outside the years 1678–2262, which do not fit the
//     int64 nanoseconds of the message: they are clamped to its range,
//     which keeps their order with every time inside it. A creation time of
//     exactly the Unix epoch reads back as none, the message's zero.
package policypb

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/policy"
)

// FromSet converts the resources of a validated set, in the set's order.
// Warnings, skipped documents and file names stay behind: they are for
// whoever reads the files.
func FromSet(set *policy.Set) (pas []*discoveryv1.PeerAuthentication, aps []*discoveryv1.AuthorizationPolicy) {
	if set == nil {
		return nil, nil
	}
	for _, pa := range set.PeerAuthentications {
		pas = append(pas, peerAuthenticationToProto(pa))
	}
	for _, ap := range set.AuthorizationPolicies {
		aps = append(aps, authorizationPolicyToProto(ap))
	}
	return pas, aps
}

// Maps and lists are copied both ways so that a Set and the messages built
// from it, or built into it, never share storage. Empty ones become nil:
// evaluation treats both alike, and proto decoding can give either, so one
// form keeps a second conversion equal to the first.
func cloneMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	return maps.Clone(m)
}

func cloneList(l []string) []string {
	if len(l) == 0 {
		return nil
	}
	return slices.Clone(l)
}

func peerAuthenticationToProto(pa *policy.PeerAuthentication) *discoveryv1.PeerAuthentication {
	m := &discoveryv1.PeerAuthentication{
		Metadata: metadataToProto(pa.Metadata, pa.Location),
		Selector: selectorToProto(pa.Spec.Selector),
	}
	if pa.Spec.MTLS != nil {
		m.MtlsMode = string(pa.Spec.MTLS.Mode)
	}
	if len(pa.Spec.PortLevelMTLS) > 0 {
		m.PortLevelMtls = make(map[uint32]string, len(pa.Spec.PortLevelMTLS))
		for port, mt := range pa.Spec.PortLevelMTLS {
			m.PortLevelMtls[port] = string(mt.Mode)
		}
	}
	return m
}

func authorizationPolicyToProto(ap *policy.AuthorizationPolicy) *discoveryv1.AuthorizationPolicy {
	m := &discoveryv1.AuthorizationPolicy{
		Metadata: metadataToProto(ap.Metadata, ap.Location),
		Selector: selectorToProto(ap.Spec.Selector),
		Action:   string(ap.Spec.Action),
	}
	for _, r := range ap.Spec.Rules {
		pr := &discoveryv1.Rule{}
		for _, f := range r.From {
			pr.From = append(pr.From, sourceToProto(f.Source))
		}
		for _, t := range r.To {
			pr.To = append(pr.To, operationToProto(t.Operation))
		}
		for _, c := range r.When {
			pr.When = append(pr.When, &discoveryv1.Condition{Key: c.Key, Values: cloneList(c.Values), NotValues: cloneList(c.NotValues)})
		}
		m.Rules = append(m.Rules, pr)
	}
	return m
}

func metadataToProto(md policy.Metadata, loc policy.Location) *discoveryv1.Metadata {
	return &discoveryv1.Metadata{
		Name:                      md.Name,
		Namespace:                 md.Namespace,
		Labels:                    cloneMap(md.Labels),
		Annotations:               cloneMap(md.Annotations),
		CreationTimestampUnixNano: unixNano(md.CreationTimestamp),
		Source:                    source(loc),
	}
}

// source writes a location as the loader's errors do, so that a problem a
// proxy reports points at the same place in the same words.
func source(loc policy.Location) string {
	switch {
	case loc.Document == 0:
		return loc.File
	case loc.Line == 0:
		return fmt.Sprintf("%s: document %d", loc.File, loc.Document)
	default:
		return fmt.Sprintf("%s: document %d (line %d)", loc.File, loc.Document, loc.Line)
	}
}

var (
	minTime = time.Unix(0, math.MinInt64)
	maxTime = time.Unix(0, math.MaxInt64)
)

// unixNano clamps rather than lets UnixNano overflow: a wrapped time could
// turn the oldest PeerAuthentication, which wins its scope, into the newest.
func unixNano(t time.Time) int64 {
	switch {
	case t.IsZero():
		return 0
	case t.Before(minTime):
		return math.MinInt64
	case t.After(maxTime):
		return math.MaxInt64
	}
	return t.UnixNano()
}

func selectorToProto(s *policy.Selector) *discoveryv1.Selector {
	if s == nil {
		return nil
	}
	return &discoveryv1.Selector{MatchLabels: cloneMap(s.MatchLabels)}
}

// sourceToProto and operationToProto send a missing entry, which only
// invalid input has, as an empty one, which ToSet rejects the same way: a
// nil element would make the whole update fail to marshal.
func sourceToProto(s *policy.Source) *discoveryv1.Source {
	if s == nil {
		return &discoveryv1.Source{}
	}
	return &discoveryv1.Source{
		Principals:    cloneList(s.Principals),
		NotPrincipals: cloneList(s.NotPrincipals),
		Namespaces:    cloneList(s.Namespaces),
		NotNamespaces: cloneList(s.NotNamespaces),
		IpBlocks:      cloneList(s.IPBlocks),
		NotIpBlocks:   cloneList(s.NotIPBlocks),
	}
}

func operationToProto(o *policy.Operation) *discoveryv1.Operation {
	if o == nil {
		return &discoveryv1.Operation{}
	}
	return &discoveryv1.Operation{
		Hosts:      cloneList(o.Hosts),
		NotHosts:   cloneList(o.NotHosts),
		Ports:      cloneList(o.Ports),
		NotPorts:   cloneList(o.NotPorts),
		Methods:    cloneList(o.Methods),
		NotMethods: cloneList(o.NotMethods),
		Paths:      cloneList(o.Paths),
		NotPaths:   cloneList(o.NotPaths),
	}
}

// ToSet converts and validates received resources. Any invalid resource
// fails the whole conversion, with every problem listed (the error matches
// policy.ErrInvalid), so that a proxy keeps its previous policies rather
// than run part of an update. The set is sorted by namespace and name, as
// the loader sorts it, and carries the validation warnings.
func ToSet(pas []*discoveryv1.PeerAuthentication, aps []*discoveryv1.AuthorizationPolicy) (*policy.Set, error) {
	set := &policy.Set{}
	c := collector{seen: map[string]string{}}
	for i, m := range pas {
		entry := fmt.Sprintf("peer_authentications[%d]", i)
		if m == nil {
			c.errs = append(c.errs, &policy.Error{File: entry, Message: "is null"})
			continue
		}
		pa := peerAuthenticationFromProto(m)
		if c.admit(policy.KindPeerAuthentication, entry, m.GetMetadata(), nil, pa.Validate) {
			set.PeerAuthentications = append(set.PeerAuthentications, pa)
		}
	}
	for i, m := range aps {
		entry := fmt.Sprintf("authorization_policies[%d]", i)
		if m == nil {
			c.errs = append(c.errs, &policy.Error{File: entry, Message: "is null"})
			continue
		}
		ap, errs := authorizationPolicyFromProto(m)
		if c.admit(policy.KindAuthorizationPolicy, entry, m.GetMetadata(), errs, ap.Validate) {
			set.AuthorizationPolicies = append(set.AuthorizationPolicies, ap)
		}
	}
	if len(c.errs) > 0 {
		return nil, fmt.Errorf("decode policies: %w", c.errs)
	}
	set.Warnings = c.warnings
	slices.SortFunc(set.PeerAuthentications, func(a, b *policy.PeerAuthentication) int {
		return byRef(a.Metadata, b.Metadata)
	})
	slices.SortFunc(set.AuthorizationPolicies, func(a, b *policy.AuthorizationPolicy) int {
		return byRef(a.Metadata, b.Metadata)
	})
	return set, nil
}

// byRef is the loader's order. Names are unique per kind and namespace, so
// an unstable sort gives the same result as its stable one.
func byRef(a, b policy.Metadata) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// collector gathers the problems of every resource, so that one NACK lists
// them all.
type collector struct {
	errs, warnings policy.Errors
	seen           map[string]string // "kind namespace/name" of kept resources → where
}

// admit validates one converted resource, with the problems conversion
// found first, and reports whether to keep it. Problems name the
// resource's source, or its place in the update when it has none.
func (c *collector) admit(kind, entry string, md *discoveryv1.Metadata, errs []*policy.Error, validate func() (errs, warnings []*policy.Error)) bool {
	where := cmp.Or(md.GetSource(), entry)
	if md == nil {
		// Without metadata, validating would only add "name is required"
		// and "namespace is invalid" to this clearer message.
		c.errs = append(c.errs, &policy.Error{File: where, Resource: kind, Field: "metadata",
			Message: "is required; the control plane sends every resource with its name and namespace"})
		return false
	}
	resource := kind + " " + md.GetNamespace() + "/" + md.GetName()
	verrs, warnings := validate()
	errs = append(errs, verrs...)
	if first, dup := c.seen[resource]; dup && len(errs) == 0 {
		errs = append(errs, &policy.Error{Field: "metadata.name",
			Message: fmt.Sprintf("%s is also sent from %s; names must be unique per kind and namespace", resource, first)})
	}
	for _, e := range slices.Concat(errs, warnings) {
		e.File, e.Resource = where, resource
	}
	if len(errs) > 0 {
		c.errs = append(c.errs, errs...)
		return false
	}
	c.warnings = append(c.warnings, warnings...)
	c.seen[resource] = where
	return true
}

func peerAuthenticationFromProto(m *discoveryv1.PeerAuthentication) *policy.PeerAuthentication {
	pa := &policy.PeerAuthentication{
		APIVersion: policy.APIVersion,
		Metadata:   metadataFromProto(m.GetMetadata()),
		Location:   policy.Location{File: m.GetMetadata().GetSource()},
		Spec:       policy.PeerAuthenticationSpec{Selector: selectorFromProto(m.GetSelector())},
	}
	if mode := m.GetMtlsMode(); mode != "" {
		pa.Spec.MTLS = &policy.MTLS{Mode: policy.MTLSMode(mode)}
	}
	if pl := m.GetPortLevelMtls(); len(pl) > 0 {
		pa.Spec.PortLevelMTLS = make(map[uint32]policy.MTLS, len(pl))
		for port, mode := range pl {
			pa.Spec.PortLevelMTLS[port] = policy.MTLS{Mode: policy.MTLSMode(mode)}
		}
	}
	return pa
}

// authorizationPolicyFromProto also returns the problems validation cannot
// see once converted.
func authorizationPolicyFromProto(m *discoveryv1.AuthorizationPolicy) (*policy.AuthorizationPolicy, []*policy.Error) {
	ap := &policy.AuthorizationPolicy{
		APIVersion: policy.APIVersion,
		Metadata:   metadataFromProto(m.GetMetadata()),
		Location:   policy.Location{File: m.GetMetadata().GetSource()},
		Spec: policy.AuthorizationPolicySpec{
			Selector: selectorFromProto(m.GetSelector()),
			Action:   policy.Action(m.GetAction()),
		},
	}
	var errs []*policy.Error
	for i, r := range m.GetRules() {
		if r == nil {
			// A null rule would convert to an empty one, which matches
			// every request: an ALLOW policy would then allow everything.
			// The wire cannot carry it, so it is a sender's bug.
			errs = append(errs, &policy.Error{Field: fmt.Sprintf("spec.rules[%d]", i),
				Message: "is null; a rule that matches every request is sent as an empty rule"})
		}
		ap.Spec.Rules = append(ap.Spec.Rules, ruleFromProto(r))
	}
	return ap, errs
}

// ruleFromProto turns a null source or operation into a missing one, and a
// null condition into one without key, for validation to reject.
func ruleFromProto(r *discoveryv1.Rule) policy.Rule {
	var out policy.Rule
	for _, s := range r.GetFrom() {
		out.From = append(out.From, policy.From{Source: sourceFromProto(s)})
	}
	for _, o := range r.GetTo() {
		out.To = append(out.To, policy.To{Operation: operationFromProto(o)})
	}
	for _, c := range r.GetWhen() {
		out.When = append(out.When, policy.Condition{
			Key:       c.GetKey(),
			Values:    cloneList(c.GetValues()),
			NotValues: cloneList(c.GetNotValues()),
		})
	}
	return out
}

func metadataFromProto(m *discoveryv1.Metadata) policy.Metadata {
	md := policy.Metadata{
		Name:        m.GetName(),
		Namespace:   m.GetNamespace(),
		Labels:      cloneMap(m.GetLabels()),
		Annotations: cloneMap(m.GetAnnotations()),
	}
	if n := m.GetCreationTimestampUnixNano(); n != 0 {
		md.CreationTimestamp = time.Unix(0, n).UTC()
	}
	return md
}

func selectorFromProto(s *discoveryv1.Selector) *policy.Selector {
	if s == nil {
		return nil
	}
	return &policy.Selector{MatchLabels: cloneMap(s.GetMatchLabels())}
}

func sourceFromProto(s *discoveryv1.Source) *policy.Source {
	if s == nil {
		return nil
	}
	return &policy.Source{
		Principals:    cloneList(s.GetPrincipals()),
		NotPrincipals: cloneList(s.GetNotPrincipals()),
		Namespaces:    cloneList(s.GetNamespaces()),
		NotNamespaces: cloneList(s.GetNotNamespaces()),
		IPBlocks:      cloneList(s.GetIpBlocks()),
		NotIPBlocks:   cloneList(s.GetNotIpBlocks()),
	}
}

func operationFromProto(o *discoveryv1.Operation) *policy.Operation {
	if o == nil {
		return nil
	}
	return &policy.Operation{
		Hosts:      cloneList(o.GetHosts()),
		NotHosts:   cloneList(o.GetNotHosts()),
		Ports:      cloneList(o.GetPorts()),
		NotPorts:   cloneList(o.GetNotPorts()),
		Methods:    cloneList(o.GetMethods()),
		NotMethods: cloneList(o.GetNotMethods()),
		Paths:      cloneList(o.GetPaths()),
		NotPaths:   cloneList(o.GetNotPaths()),
	}
}
