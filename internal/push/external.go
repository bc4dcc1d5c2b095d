package push

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/policy"
)

// externalDestinations turns the ServiceEntries, with their DestinationRules
// and VirtualServices, into the destinations every proxy may call outside
// the mesh: one per host and port the application dials, its endpoints the
// entry's (or the host itself) at the port traffic goes to — the port's
// targetPort, or the port a VirtualService routes it to — and the TLS the
// DestinationRule asks for on that port.
func externalDestinations(set *policy.Set, vips map[string]netip.Addr) []*discoveryv1.Destination {
	if set == nil {
		return nil
	}
	rules := map[string]*policy.DestinationRule{}
	for _, dr := range set.DestinationRules {
		rules[strings.ToLower(dr.Spec.Host)] = dr
	}
	routes := map[string]uint32{} // "host:port" → the port it is sent to
	for _, vs := range set.VirtualServices {
		for _, r := range vs.Spec.PortRoutes {
			routes[strings.ToLower(r.Host)+":"+strconv.Itoa(int(r.Port))] = r.To
		}
	}
	var out []*discoveryv1.Destination
	for _, se := range set.ServiceEntries {
		byNumber := map[uint32]policy.ServiceEntryPort{}
		for _, p := range se.Spec.Ports {
			byNumber[p.Number] = p
		}
		for _, h := range se.Spec.Hosts {
			h = strings.ToLower(strings.TrimSuffix(h, "."))
			for _, p := range se.Spec.Ports {
				to := p
				if n, ok := routes[h+":"+strconv.Itoa(int(p.Number))]; ok {
					to = byNumber[n]
				}
				d := &discoveryv1.Destination{Service: h, Port: p.Number, Protocol: appProtocol(p.Protocol), External: true}
				if vip, ok := vips[h]; ok {
					d.Addresses = []string{netip.AddrPortFrom(vip, uint16(p.Number)).String()}
				}
				target := to.TargetPort
				if target == 0 {
					target = to.Number
				}
				if len(se.Spec.Endpoints) == 0 {
					d.Endpoints = []*discoveryv1.Endpoint{{Address: joinHostPort(h, target)}}
				}
				for _, ep := range se.Spec.Endpoints {
					port := target
					if n, ok := ep.Ports[to.Name]; ok {
						port = n
					}
					d.Endpoints = append(d.Endpoints, &discoveryv1.Endpoint{Address: joinHostPort(ep.Address, port)})
				}
				if dr := rules[h]; dr != nil {
					if t := dr.Spec.For(to.Number); t != nil && t.Mode != policy.TLSDisable {
						d.Tls = &discoveryv1.OriginateTLS{Mode: t.Mode, ClientCertificate: t.ClientCertificate, PrivateKey: t.PrivateKey,
							CaCertificates: t.CACertificates, Sni: t.SNI, SubjectAltNames: slices.Clone(t.SubjectAltNames), InsecureSkipVerify: t.InsecureSkipVerify}
					}
				}
				out = append(out, d)
			}
		}
	}
	return out
}

// appProtocol is how the proxy handles what the application sends to a
// ServiceEntry port: HTTP it parses; HTTPS and TLS (the application's own
// TLS) and TCP it relays.
func appProtocol(p string) string {
	switch strings.ToUpper(p) {
	case "HTTP":
		return "http"
	case "HTTP2":
		return "http2"
	case "GRPC":
		return "grpc"
	}
	return "tcp"
}

func joinHostPort(host string, port uint32) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + strconv.Itoa(int(port))
	}
	return host + ":" + strconv.Itoa(int(port))
}

// gatewayRoutes are the HTTPRoute rules attached to the gateway workload
// ref (namespace/name), one per path match, in the order written.
func gatewayRoutes(set *policy.Set, ref string) []*discoveryv1.GatewayRoute {
	if set == nil {
		return nil
	}
	var out []*discoveryv1.GatewayRoute
	for _, hr := range set.HTTPRoutes {
		if !slices.Contains(hr.Spec.Gateways, ref) {
			continue
		}
		for _, r := range hr.Spec.Rules {
			ns, name, _ := strings.Cut(r.Backend, "/")
			paths := r.Paths
			if len(paths) == 0 {
				paths = []policy.HTTPPathMatch{{Value: "/"}}
			}
			for _, p := range paths {
				out = append(out, &discoveryv1.GatewayRoute{Route: hr.Metadata.Ref(), Hostnames: hr.Spec.Hostnames, Path: p.Value, Exact: p.Exact,
					Service: name + "." + ns, Port: r.BackendPort})
			}
		}
	}
	return out
}

// ExternalAddresses gives each ServiceEntry host a virtual IP from prefix,
// in the order of the hosts' names, for runtimes whose applications reach
// hosts by address (transparent interception resolves them to these in
// hosts files): the sidecar then knows which host a connection is for.
// Hosts past the prefix's size get none. A zero prefix gives none.
func ExternalAddresses(set *policy.Set, prefix netip.Prefix) map[string]netip.Addr {
	out := map[string]netip.Addr{}
	if set == nil || !prefix.IsValid() {
		return out
	}
	var hosts []string
	for _, se := range set.ServiceEntries {
		for _, h := range se.Spec.Hosts {
			hosts = append(hosts, strings.ToLower(h))
		}
	}
	slices.Sort(hosts)
	a := prefix.Masked().Addr().Next()
	for _, h := range slices.Compact(hosts) {
		if !prefix.Contains(a) {
			break
		}
		out[h] = a
		a = a.Next()
	}
	return out
}
