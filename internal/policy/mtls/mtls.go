// Package mtls decides which PeerAuthentication mode applies to a workload
// port, following Istio's "Authentication" concept page ("Peer
// authentication", "Policy storage", "Policy precedence") and the
// PeerAuthentication reference:
//
//   - A policy without selector in the root namespace is mesh-wide; one
//     without selector in another namespace is namespace-wide; one with a
//     selector is workload-specific, and applies to the workloads of its own
//     namespace whose labels it matches. A selector policy in the root
//     namespace therefore only concerns workloads of the root namespace
//     itself, and is ignored for every other namespace. A selector with no
//     labels is no selector.
//   - The narrowest policy wins: workload over namespace over mesh, and for
//     a port listed in the workload policy's portLevelMtls, that entry.
//   - UNSET (or no mtls at all) inherits from the next wider scope; a port
//     entry with UNSET inherits the workload's resulting mode. With no
//     policy anywhere the mode is PERMISSIVE.
//   - When several policies compete for one scope (two mesh-wide policies,
//     two namespace-wide ones in one namespace, or two workload policies
//     matching one workload), the oldest wins, as in Istio: the one with the
//     earliest metadata.creationTimestamp. Files rarely carry a creation
//     time, so a policy without one counts as older than any policy with
//     one (its time is the zero time), and equal times are broken by
//     namespace/name in lexical order, the first winning. This is
//     deterministic and matches Istio's own ordering for equal timestamps.
//
// Resolution is a pure function of the policies, the workload and the port.
package mtls

import (
	"cmp"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// Scope is where the deciding mode came from.
type Scope string

// The scopes, widest first.
const (
	ScopeDefault   Scope = "default" // no policy anywhere set a mode
	ScopeMesh      Scope = "mesh"
	ScopeNamespace Scope = "namespace"
	ScopeWorkload  Scope = "workload"
	ScopePort      Scope = "port"
)

// ScopeOf reports the scope a policy is written for, given the root
// namespace.
func ScopeOf(pa *policy.PeerAuthentication, root string) Scope {
	switch {
	case !pa.Spec.Selector.Empty():
		return ScopeWorkload
	case pa.Metadata.Namespace == root:
		return ScopeMesh
	default:
		return ScopeNamespace
	}
}

// Result is the mode of one workload port and how it was reached.
type Result struct {
	Mode policy.MTLSMode // never UNSET
	// Policy set Mode; nil when it is the PERMISSIVE default.
	Policy *policy.PeerAuthentication
	Scope  Scope
	// Mesh, Namespace and Workload are the policies selected at each scope
	// (nil where none applies), including those whose mode was UNSET.
	Mesh, Namespace, Workload *policy.PeerAuthentication
	// Ignored are policies that applied but lost to an older one of the
	// same scope.
	Ignored []*policy.PeerAuthentication
}

// Resolve returns the mode of port on the workload.
func Resolve(pas []*policy.PeerAuthentication, root string, wl policy.Workload, port uint32) Result {
	var mesh, ns, work []*policy.PeerAuthentication
	for _, pa := range pas {
		switch scope := ScopeOf(pa, root); {
		case scope == ScopeMesh:
			mesh = append(mesh, pa)
		case pa.Metadata.Namespace != wl.Namespace:
			// Namespace and workload policies only concern their namespace.
		case scope == ScopeNamespace:
			ns = append(ns, pa)
		case pa.Spec.Selector.Matches(wl.Labels):
			work = append(work, pa)
		}
	}
	r := Result{Mode: policy.ModePermissive, Scope: ScopeDefault}
	pick := func(c []*policy.PeerAuthentication) *policy.PeerAuthentication {
		if len(c) == 0 {
			return nil
		}
		slices.SortFunc(c, Older)
		r.Ignored = append(r.Ignored, c[1:]...)
		return c[0]
	}
	r.Mesh, r.Namespace, r.Workload = pick(mesh), pick(ns), pick(work)
	set := func(pa *policy.PeerAuthentication, m policy.MTLSMode, s Scope) {
		if m != policy.ModeUnset {
			r.Mode, r.Policy, r.Scope = m, pa, s
		}
	}
	if r.Mesh != nil {
		set(r.Mesh, r.Mesh.Spec.MTLS.Effective(), ScopeMesh)
	}
	if r.Namespace != nil {
		set(r.Namespace, r.Namespace.Spec.MTLS.Effective(), ScopeNamespace)
	}
	if w := r.Workload; w != nil {
		set(w, w.Spec.MTLS.Effective(), ScopeWorkload)
		if pm, ok := w.Spec.PortLevelMTLS[port]; ok {
			set(w, pm.Effective(), ScopePort)
		}
	}
	return r
}

// Older orders policies oldest first: by creation time (none = oldest),
// then namespace, then name.
func Older(a, b *policy.PeerAuthentication) int {
	return cmp.Or(
		a.Metadata.CreationTimestamp.Compare(b.Metadata.CreationTimestamp),
		strings.Compare(a.Metadata.Namespace, b.Metadata.Namespace),
		strings.Compare(a.Metadata.Name, b.Metadata.Name),
	)
}

// Ports is the resolved mode of every port of one workload, for a proxy to
// consult per connection without walking policies.
type Ports struct {
	def   policy.MTLSMode
	ports map[uint32]policy.MTLSMode
}

// ForWorkload resolves the modes of a workload once per policy change.
func ForWorkload(pas []*policy.PeerAuthentication, root string, wl policy.Workload) Ports {
	r := Resolve(pas, root, wl, 0)
	p := Ports{def: r.Mode}
	if r.Workload != nil {
		for port := range r.Workload.Spec.PortLevelMTLS {
			if p.ports == nil {
				p.ports = map[uint32]policy.MTLSMode{}
			}
			p.ports[port] = Resolve(pas, root, wl, port).Mode
		}
	}
	return p
}

// Mode returns the mode of a port.
func (p Ports) Mode(port uint32) policy.MTLSMode {
	if m, ok := p.ports[port]; ok {
		return m
	}
	return p.def
}

// Admits reports whether a connection with (or without) a client
// certificate is accepted under mode m. DISABLE accepts both at this level:
// the proxy does not terminate TLS, so a caller's certificate is never
// verified and the caller counts as unauthenticated.
func Admits(m policy.MTLSMode, clientCert bool) bool {
	return m != policy.ModeStrict || clientCert
}

// Conflict is a policy that loses to an older one of the same scope.
type Conflict struct {
	Ignored, Winner *policy.PeerAuthentication
	// Partly is true for workload policies whose selectors overlap: the
	// older wins only for the workloads both select.
	Partly bool
}

// Conflicts lists the policies that lose to older ones, for reports. Two
// workload policies conflict when every label of one's selector is in the
// other's, so every workload the narrower selects is selected by both.
func Conflicts(pas []*policy.PeerAuthentication, root string) []Conflict {
	sorted := slices.Clone(pas)
	slices.SortFunc(sorted, Older)
	var out []Conflict
	first := map[string]*policy.PeerAuthentication{}
	for _, pa := range sorted {
		scope := ScopeOf(pa, root)
		if scope == ScopeWorkload {
			continue
		}
		k := string(scope) + "/" + pa.Metadata.Namespace
		if w, ok := first[k]; ok {
			out = append(out, Conflict{Ignored: pa, Winner: w})
			continue
		}
		first[k] = pa
	}
	for i, older := range sorted {
		if ScopeOf(older, root) != ScopeWorkload {
			continue
		}
		for _, newer := range sorted[i+1:] {
			if ScopeOf(newer, root) != ScopeWorkload || newer.Metadata.Namespace != older.Metadata.Namespace {
				continue
			}
			if subset(older.Spec.Selector.MatchLabels, newer.Spec.Selector.MatchLabels) || subset(newer.Spec.Selector.MatchLabels, older.Spec.Selector.MatchLabels) {
				out = append(out, Conflict{Ignored: newer, Winner: older, Partly: true})
			}
		}
	}
	return out
}

// subset reports whether every label of a is in b.
func subset(a, b map[string]string) bool {
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
