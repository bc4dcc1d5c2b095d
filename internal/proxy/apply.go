package proxy

import (
	"errors"
	"fmt"
	"maps"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// Update is configuration pushed by the control plane. Apply does not
// modify it, but the compiled policies may refer to Policies, which the
// caller must therefore leave as they are.
type Update struct {
	// Version identifies the update; PolicyVersion (for pushed policies)
	// and ConfigVersion report it.
	Version string
	// Labels are the workload's labels as registered; they select which of
	// Policies apply (the static configuration's labels do not). With
	// Policies nil they have nothing to select and are ignored.
	Labels map[string]string
	// Policies are the PeerAuthentications and AuthorizationPolicies that
	// may apply, already validated. nil leaves the policies in force
	// unchanged; an empty set means no policy. A proxy whose configuration
	// names a policy directory takes its policies from there only, and
	// refuses an update that carries some.
	Policies *policy.Set
	// Destinations are every destination service port the workload may
	// call, with their virtual addresses (for transparent interception)
	// and their endpoints. A destination replaces the static configuration's
	// outbound entry of the same service and port, whose listener then
	// follows it.
	Destinations []config.Outbound
	// RegistryOnly refuses destinations that are not in Destinations (nor
	// the static configuration) instead of passing them through: the
	// mesh's outboundTrafficPolicy REGISTRY_ONLY.
	RegistryOnly bool
	// GatewayRoutes are what a gateway serves (none for other proxies).
	GatewayRoutes []GatewayRoute
}

// ErrPoliciesFromDirectory is returned by Apply for an update that carries
// policies to a proxy that reads them from a directory: there is one source
// of truth for what a workload admits.
var ErrPoliciesFromDirectory = errors.New("policies come from the directory in the proxy configuration")

// Apply puts an update in force, all of it or nothing: the policies and the
// routing table are compiled first, and any error (the caller NACKs with
// its text) leaves the previous configuration running. Then the new table
// and policies are swapped in. Requests and streams under way finish where
// they started (the next request on a keep-alive connection follows the
// new table); pooled connections to endpoints the update removed or gave
// another identity close once their last request is done; and inbound
// connections the new mTLS modes no longer admit are closed, as a policy
// directory change does. The two swaps are not one: no decision reads both
// the routes (outbound) and the policies (inbound).
func (p *Proxy) Apply(u Update) error {
	p.applyMu.Lock()
	defer p.applyMu.Unlock()
	var st *policyState
	if u.Policies != nil {
		if dir := p.opts.Config.Policies; dir != "" {
			return fmt.Errorf("apply %s: %w (%s); remove policies from it to take them from the control plane", u.Version, ErrPoliciesFromDirectory, dir)
		}
		wl := policy.Workload{Namespace: p.workload.Namespace, Name: p.workload.Name, Labels: maps.Clone(u.Labels)}
		var err error
		if st, err = compilePolicies(u.Policies, wl, u.Version); err != nil {
			return fmt.Errorf("apply %s: policies: %w", u.Version, err)
		}
	}
	prev := p.table.Load()
	tbl, err := buildTable(p.opts.Config.Outbound, u.Destinations, prev, p.mesh, p.dialer, p.log)
	if err != nil {
		return fmt.Errorf("apply %s: %w", u.Version, err)
	}
	tbl.version = u.Version
	tbl.registryOnly = u.RegistryOnly
	tbl.gateway = compileGatewayRoutes(u.GatewayRoutes)

	p.table.Store(tbl)
	// Requests that resolved a route of prev may still reach a retired
	// peer; they get a pool of their own, which closes after them.
	for _, pe := range retiredPeers(prev, tbl) {
		pe.retire()
	}
	for _, o := range retiredExternals(prev, tbl) {
		o.retire()
	}
	if st != nil {
		p.policies.Store(st)
		p.closeInadmissible(st)
	}
	p.log.Info("configuration applied", "version", u.Version, "destinations", len(u.Destinations), "policies", st != nil)
	return nil
}
