package discovery

import (
	"fmt"
	"net/netip"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/policy/policypb"
	"github.com/trellis-mesh/trellis/internal/proxy"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// ProxyUpdate turns a pushed update into the proxy's terms. The policies
// are validated again (the proxy trusts the control plane's identity, not
// every byte it sends); the proxy validates the destinations when it
// applies them.
func ProxyUpdate(u *discoveryv1.Update) (proxy.Update, error) {
	set, err := policypb.ToSet(u.GetPeerAuthentications(), u.GetAuthorizationPolicies())
	if err != nil {
		return proxy.Update{}, fmt.Errorf("policies: %w", err)
	}
	out := proxy.Update{Version: u.GetVersion(), Labels: u.GetWorkload().GetLabels(), Policies: set, RegistryOnly: u.GetRegistryOnly()}
	for _, r := range u.GetGatewayRoutes() {
		out.GatewayRoutes = append(out.GatewayRoutes, proxy.GatewayRoute{Route: r.GetRoute(), Hostnames: r.GetHostnames(), Path: r.GetPath(),
			Exact: r.GetExact(), Service: r.GetService(), Port: r.GetPort()})
	}
	for _, d := range u.GetDestinations() {
		o := config.Outbound{Service: d.GetService(), Port: d.GetPort(), Protocol: config.Protocol(d.GetProtocol()), Addresses: d.GetAddresses(), External: d.GetExternal()}
		if t := d.GetTls(); t != nil {
			o.TLS = &config.OriginateTLS{Mode: t.GetMode(), ClientCertificate: t.GetClientCertificate(), PrivateKey: t.GetPrivateKey(),
				CACertificates: t.GetCaCertificates(), SNI: t.GetSni(), SubjectAltNames: t.GetSubjectAltNames(), InsecureSkipVerify: t.GetInsecureSkipVerify()}
		}
		for _, e := range d.GetEndpoints() {
			o.Endpoints = append(o.Endpoints, config.Endpoint{Address: e.GetAddress(), Identity: e.GetIdentity()})
		}
		out.Destinations = append(out.Destinations, o)
	}
	return out, nil
}

// PortAddresses says where mesh peers reach each inbound port of cfg: the
// port's own listener, or under transparent interception the workload's
// IP and the port itself. advertiseIP replaces a wildcard listen address
// and is required for transparent inbound ports.
func PortAddresses(cfg *config.Config, advertiseIP string) ([]*discoveryv1.PortAddress, error) {
	var out []*discoveryv1.PortAddress
	for i, in := range cfg.Inbound {
		var addr string
		if in.Listen != "" {
			var err error
			if addr, err = Advertised(in.Listen, advertiseIP); err != nil {
				return nil, fmt.Errorf("inbound[%d].listen: %w", i, err)
			}
		} else {
			if advertiseIP == "" {
				return nil, fmt.Errorf("inbound[%d] (app port %d) is reached by transparent interception: give --advertise-ip, the workload's address", i, in.AppPort)
			}
			addr = netip.AddrPortFrom(netip.MustParseAddr(advertiseIP), uint16(in.AppPort)).String()
		}
		out = append(out, &discoveryv1.PortAddress{Port: in.AppPort, Address: addr})
	}
	return out, nil
}

// Advertised returns where others reach a listener on listen (ip:port):
// listen itself, or for a wildcard address advertiseIP and its port.
func Advertised(listen, advertiseIP string) (string, error) {
	addr, err := netip.ParseAddrPort(listen)
	if err != nil {
		return "", fmt.Errorf("%q is not ip:port", listen)
	}
	if addr.Addr().IsUnspecified() {
		if advertiseIP == "" {
			return "", fmt.Errorf("%s is a wildcard address: give --advertise-ip so peers know where to connect", listen)
		}
		addr = netip.AddrPortFrom(netip.MustParseAddr(advertiseIP), addr.Port())
	}
	return addr.String(), nil
}
