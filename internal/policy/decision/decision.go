// Package decision answers "may this caller do this?" for one connection or
// request to a workload, the way a Trellis proxy decides it: first the
// PeerAuthentication mode of the port (a STRICT port refuses a caller
// without a client certificate), then authorization. Its Decision carries
// the policies and rules responsible and human reasons; Report renders it
// as the text and JSON of `trellis policy explain`.
package decision

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/meshid"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"github.com/trellis-mesh/trellis/internal/policy/match"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
)

// Protocol is how the workload port is spoken.
type Protocol string

// The protocols authorization distinguishes.
const (
	HTTP Protocol = "http"
	TCP  Protocol = "tcp"
)

// Input is one connection (TCP) or request (HTTP) to a workload.
type Input struct {
	Workload policy.Workload
	Port     uint32
	Protocol Protocol
	Peer     Peer
	Request  Request // ignored for TCP
}

// Peer is the caller.
type Peer struct {
	// Authenticated is true when the caller presented a client certificate
	// (mutual TLS); Principal is then its SPIFFE ID without "spiffe://".
	Authenticated bool
	Principal     string
	// Namespace is derived from Principal when empty.
	Namespace string
	IP        netip.Addr // zero when unknown
}

// Request is the HTTP part of an input.
type Request struct {
	Method  string
	Path    string
	Host    string
	Headers http.Header
}

// Mesh is a compiled policy Set.
type Mesh struct {
	Set   *policy.Set
	Root  string
	authz *authz.Index
}

// Compile compiles a validated Set; root is the mesh root namespace.
func Compile(set *policy.Set, root string) (*Mesh, error) {
	x, err := authz.Compile(set.AuthorizationPolicies, root)
	if err != nil {
		return nil, err
	}
	return &Mesh{Set: set, Root: root, authz: x}, nil
}

// Authz returns the compiled authorization policies.
func (m *Mesh) Authz() *authz.Index { return m.authz }

// Decision is the outcome for one Input.
type Decision struct {
	Input   Input
	Allowed bool
	// DeniedBy is "mtls" or "authorization" when denied.
	DeniedBy string
	MTLS     MTLS
	// Authz is nil when mTLS refused the connection before authorization.
	Authz *authz.Explanation
	// Request is what authorization saw.
	Request authz.Request
	Notes   []string
}

// MTLS is the PeerAuthentication part of a decision.
type MTLS struct {
	mtls.Result
	Admitted bool
	Reason   string
}

// Why the deciding layer.
const (
	ByMTLS          = "mtls"
	ByAuthorization = "authorization"
)

// NamespaceOf returns the namespace of a principal of the form
// TRUST_DOMAIN/ns/NAMESPACE/sa/NAME, or "".
func NamespaceOf(principal string) string { return meshid.NamespaceOf(principal) }

// Decide evaluates the input against every policy.
func (m *Mesh) Decide(in Input) Decision {
	if in.Protocol == "" {
		in.Protocol = HTTP
	}
	if in.Peer.Authenticated && in.Peer.Namespace == "" {
		in.Peer.Namespace = NamespaceOf(in.Peer.Principal)
	}
	d := Decision{Input: in}
	wl := in.Workload

	r := mtls.Resolve(m.Set.PeerAuthentications, m.Root, wl, in.Port)
	d.MTLS = MTLS{Result: r, Admitted: mtls.Admits(r.Mode, in.Peer.Authenticated)}
	from := "no PeerAuthentication applies, so the default"
	switch {
	case r.Scope == mtls.ScopePort:
		from = fmt.Sprintf("the port %d setting of workload PeerAuthentication %s", in.Port, r.Policy.Metadata.Ref())
	case r.Policy != nil:
		from = fmt.Sprintf("%s PeerAuthentication %s", scopeWord(r.Scope), r.Policy.Metadata.Ref())
	}
	switch {
	case !d.MTLS.Admitted:
		d.MTLS.Reason = fmt.Sprintf("port %d requires mTLS (mode %s from %s) and the caller sent plaintext", in.Port, r.Mode, from)
	case r.Mode == policy.ModeDisable && in.Peer.Authenticated:
		d.MTLS.Reason = fmt.Sprintf("mode %s from %s: the proxy does not terminate mTLS, so the caller counts as unauthenticated", r.Mode, from)
	case in.Peer.Authenticated:
		d.MTLS.Reason = fmt.Sprintf("mode %s from %s accepts the caller's mTLS", r.Mode, from)
	default:
		d.MTLS.Reason = fmt.Sprintf("mode %s from %s accepts plaintext", r.Mode, from)
	}
	for _, pa := range r.Ignored {
		d.Notes = append(d.Notes, fmt.Sprintf("PeerAuthentication %s is ignored: an older policy of the same scope applies (oldest wins)", pa.Metadata.Ref()))
	}
	if !d.MTLS.Admitted {
		d.DeniedBy = ByMTLS
		return d
	}

	req := authz.Request{
		HTTP: in.Protocol == HTTP,
		Port: in.Port,
		IP:   in.Peer.IP,
	}
	if in.Peer.Authenticated && r.Mode != policy.ModeDisable {
		req.Principal, req.Namespace = in.Peer.Principal, in.Peer.Namespace
	}
	if req.HTTP {
		req.Method, req.Path, req.Host, req.Headers = in.Request.Method, in.Request.Path, in.Request.Host, in.Request.Headers
		if clean := match.CleanPath(req.Path); clean != req.Path {
			d.Notes = append(d.Notes, fmt.Sprintf("path %s is matched as %s (query removed, dot segments resolved)", req.Path, clean))
		}
	}
	d.Request = req
	x := m.authz.ForWorkload(wl).Explain(&req)
	d.Authz = &x
	d.Allowed = x.Result.Allowed
	if !d.Allowed {
		d.DeniedBy = ByAuthorization
	}
	if len(wl.Labels) == 0 {
		var missed []string
		for _, p := range m.authz.Policies() {
			ns := p.Source.Metadata.Namespace
			if (ns == wl.Namespace || ns == m.Root) && !p.Source.Spec.Selector.Empty() {
				missed = append(missed, p.Ref)
			}
		}
		for _, pa := range m.Set.PeerAuthentications {
			if pa.Metadata.Namespace == wl.Namespace && !pa.Spec.Selector.Empty() {
				missed = append(missed, pa.Metadata.Ref())
			}
		}
		if len(missed) > 0 {
			slices.Sort(missed)
			d.Notes = append(d.Notes, fmt.Sprintf("the workload has no labels, so policies with a selector do not apply to it: %s", strings.Join(slices.Compact(missed), ", ")))
		}
	}
	return d
}

func scopeWord(s mtls.Scope) string {
	switch s {
	case mtls.ScopeMesh:
		return "mesh-wide"
	case mtls.ScopeNamespace:
		return "namespace-wide"
	case mtls.ScopeWorkload:
		return "workload"
	}
	return string(s)
}
