package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// routeTable is where the application's outbound traffic goes, as one
// immutable value. New builds the first from the static configuration and
// every Apply builds a whole new one and swaps it in (Proxy.table), so a
// connection or request sees the old table or the new, never a mix, and
// reading it costs one atomic load.
type routeTable struct {
	// version is the Update.Version the table was built from; "" for the
	// static configuration alone.
	version string
	// byAddr maps an original destination to its route (transparent
	// interception): services' virtual addresses, and each endpoint's own
	// address for an application that dials one instance directly.
	byAddr map[netip.AddrPort]*route
	// byHost maps the names of a service and its port to its route, for
	// requests to the HTTP proxy listener.
	byHost map[hostPort]*route
	// listeners[i] is the route serving the listener of the static
	// configuration's outbound[i] (nil for an entry without one). It is
	// resolved when the table is built, so the request path only indexes.
	listeners []*route
	// peers are the connection pools of the endpoints, by address. A peer
	// whose address and identity stay the same carries over to the next
	// table, so that an update does not reconnect to it.
	peers map[string]*peer
	// externals are the originators of external destinations, by what
	// they do (originatorKey); they carry over likewise.
	externals map[string]*originator
	// registryOnly refuses what the table has no route for instead of
	// passing it through (outboundTrafficPolicy REGISTRY_ONLY).
	registryOnly bool
	// gateway are the routes of an ingress gateway, most specific first.
	gateway []GatewayRoute
}

// outboundTarget is what an application's connection was made to, which
// the table in force resolves to a route: the listener of a static
// outbound entry, or (intercepted) an original destination. Requests on a
// keep-alive connection resolve it again each time, so an update reaches
// connections that were already open.
type outboundTarget struct {
	listener int // index in Config.Outbound; -1 otherwise
	dst      netip.AddrPort
	// httpProxy marks the HTTP proxy listener: each request names its
	// destination.
	httpProxy bool
}

// hostPort is a destination as an HTTP proxy request names it.
type hostPort struct {
	host string // lower case, without a trailing dot
	port uint32
}

// resolve returns the route for target, or nil if the table has none (an
// intercepted destination the control plane has since removed, or the
// HTTP proxy listener, whose requests resolve one by one).
func (t *routeTable) resolve(target outboundTarget) *route {
	if target.httpProxy {
		return nil
	}
	if target.listener >= 0 {
		return t.listeners[target.listener]
	}
	return t.byAddr[target.dst]
}

// buildTable builds the routing table from the static configuration's
// outbound entries and the destinations the control plane pushed (none
// before the first update). A pushed destination replaces the static entry
// of the same service and port, whose listener then follows it; a static
// entry the control plane does not name stays as it is written. The table
// is checked as a whole, so a conflict between the two sources (an address
// claimed twice, an endpoint with two identities) is an error. Peers of
// prev that are still wanted are reused; buildTable changes nothing else,
// so a failed update leaves no trace.
func buildTable(static, pushed []config.Outbound, prev *routeTable, mt *meshTransport, dialer *net.Dialer, log *slog.Logger) (*routeTable, error) {
	if prev == nil {
		prev = &routeTable{}
	}
	if err := checkPushed(pushed); err != nil {
		return nil, err
	}
	// Resolve each static entry to the pushed destination that replaces
	// it, if any: index in pushed, or -1 when the entry stays.
	replacedBy := make([]int, len(static))
	var errs []error
	for i, s := range static {
		replacedBy[i] = -1
		var matches []int
		for j, d := range pushed {
			if d.Service == s.Service && (s.Port == 0 || d.Port == 0 || s.Port == d.Port) {
				matches = append(matches, j)
			}
		}
		switch len(matches) {
		case 0:
		case 1:
			replacedBy[i] = matches[0]
		default:
			var ports []string
			for _, j := range matches {
				ports = append(ports, strconv.Itoa(int(pushed[j].Port)))
			}
			errs = append(errs, fmt.Errorf("proxy configuration outbound[%d] names %s without a port, and the control plane sent its ports %s: set outbound[%d].port", i, s.Service, strings.Join(ports, ", "), i))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	// One list, validated as a whole: the pushed destinations, then the
	// static entries nothing replaced.
	outs := slices.Clone(pushed) // validation normalizes protocols in place
	fields := make([]string, 0, len(pushed)+len(static))
	for j := range pushed {
		fields = append(fields, fmt.Sprintf("destinations[%d]", j))
	}
	staticAt := make([]int, len(static)) // static entry → index in outs
	for i, s := range static {
		if replacedBy[i] >= 0 {
			staticAt[i] = replacedBy[i]
			continue
		}
		staticAt[i] = len(outs)
		outs = append(outs, s)
		fields = append(fields, fmt.Sprintf("proxy configuration outbound[%d]", i))
	}
	if err := config.ValidateOutbound(outs, func(i int) string { return fields[i] }); err != nil {
		return nil, err
	}

	t := &routeTable{
		byAddr:    map[netip.AddrPort]*route{},
		byHost:    map[hostPort]*route{},
		listeners: make([]*route, len(static)),
		peers:     map[string]*peer{},
		externals: map[string]*originator{},
	}
	external := func(out config.Outbound) *originator {
		k := originatorKey(out.Service, out.TLS)
		if o, ok := t.externals[k]; ok {
			return o
		}
		o, ok := prev.externals[k]
		if !ok {
			o = newOriginator(out.Service, out.TLS, dialer, log)
		}
		t.externals[k] = o
		return o
	}
	peerFor := func(addr string, id spiffeid.ID) *peer {
		if pe, ok := t.peers[addr]; ok {
			return pe
		}
		pe, ok := prev.peers[addr]
		if !ok || pe.id != id {
			pe = mt.newPeer(addr, id)
		}
		t.peers[addr] = pe
		return pe
	}
	byOut := make([]*route, len(outs))
	for k, out := range outs {
		rt := newRoute(out, peerFor, external)
		byOut[k] = rt
		for _, a := range out.Addresses {
			t.byAddr[canonicalAddr(a)] = rt
		}
		if out.External {
			t.byHost[hostPort{strings.TrimSuffix(strings.ToLower(out.Service), "."), out.Port}] = rt
		} else if out.Port != 0 {
			for _, name := range meshid.ServiceHostNames(out.Service) {
				t.byHost[hostPort{name, out.Port}] = rt
			}
		}
	}
	// An application may dial one endpoint directly (a StatefulSet member,
	// a headless service): that goes through the mesh too, to that
	// endpoint only, with its identity checked.
	for _, rt := range byOut {
		if rt.external != nil {
			continue // reached by name; its endpoints are not the mesh's
		}
		for _, ep := range rt.endpoints {
			if _, ok := t.byAddr[canonicalAddr(ep.addr)]; !ok {
				t.byAddr[canonicalAddr(ep.addr)] = &route{service: rt.service, protocol: rt.protocol, endpoints: []endpoint{ep}}
			}
		}
	}
	for i, s := range static {
		if s.Listen != "" {
			t.listeners[i] = byOut[staticAt[i]]
		}
	}
	return t, nil
}

// checkPushed checks what only pushed destinations must satisfy: the
// ports of a service sent several times tell its destinations apart, so
// that a listener following the service has one destination to follow; and
// no destination asks for a listener, which only the proxy configuration
// opens.
func checkPushed(pushed []config.Outbound) error {
	type key struct {
		service string
		port    uint32
	}
	seen := map[key]int{}
	count := map[string]int{}
	for _, d := range pushed {
		count[d.Service]++
	}
	var errs []error
	for j, d := range pushed {
		if d.Listen != "" {
			errs = append(errs, fmt.Errorf("destinations[%d].listen: %q: listeners come from the proxy configuration only", j, d.Listen))
		}
		if count[d.Service] > 1 && d.Port == 0 {
			errs = append(errs, fmt.Errorf("destinations[%d].port: %s is sent %d times; each of its destinations needs its service port", j, d.Service, count[d.Service]))
			continue
		}
		k := key{d.Service, d.Port}
		if prev, dup := seen[k]; dup {
			errs = append(errs, fmt.Errorf("destinations[%d]: %s port %d is also destinations[%d]", j, d.Service, d.Port, prev))
			continue
		}
		seen[k] = j
	}
	return errors.Join(errs...)
}

// retiredExternals returns the originators of old that new no longer uses.
func retiredExternals(old, new *routeTable) []*originator {
	var gone []*originator
	for k, o := range old.externals {
		if new.externals[k] != o {
			gone = append(gone, o)
		}
	}
	return gone
}

// retiredPeers returns the peers of old that new no longer uses: their
// pools close once the requests in flight on them are done.
func retiredPeers(old, new *routeTable) []*peer {
	var gone []*peer
	for addr, pe := range old.peers {
		if new.peers[addr] != pe {
			gone = append(gone, pe)
		}
	}
	return gone
}
