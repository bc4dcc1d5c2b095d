package policy

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/meshid"
)

// The networking resources: destinations outside the mesh and how the
// sidecar reaches them. They keep the shape of Istio's, whose
// networking.istio.io apiVersions are accepted as aliases.
const (
	NetworkingGroup      = "networking.trellis.dev"
	IstioNetworkingGroup = "networking.istio.io"
	NetworkingAPIVersion = NetworkingGroup + "/v1"

	KindServiceEntry    = "ServiceEntry"
	KindDestinationRule = "DestinationRule"
	KindVirtualService  = "VirtualService"
)

// ServiceEntry adds hosts outside the mesh to what its sidecars know.
type ServiceEntry struct {
	APIVersion string
	Metadata   Metadata
	Location   Location
	Spec       ServiceEntrySpec
}

// ServiceEntrySpec is Istio's ServiceEntry spec, the subset Trellis serves.
type ServiceEntrySpec struct {
	Hosts []string
	Ports []ServiceEntryPort
	// Location is MESH_EXTERNAL (the default) or MESH_INTERNAL.
	Location string
	// Resolution is DNS (the default: endpoints, or the hosts themselves,
	// are looked up when connecting) or STATIC (endpoints are addresses).
	Resolution string
	Endpoints  []ServiceEntryEndpoint
}

// ServiceEntryPort is a port the application calls.
type ServiceEntryPort struct {
	Number   uint32
	Name     string
	Protocol string // HTTP, HTTPS, HTTP2, GRPC, TLS, TCP
	// TargetPort is the endpoints' port (Number unless set).
	TargetPort uint32
}

// ServiceEntryEndpoint is one endpoint of a ServiceEntry.
type ServiceEntryEndpoint struct {
	Address string
	// Ports maps a port name to the endpoint's port for it.
	Ports map[string]uint32
}

// DestinationRule says how the sidecar connects to a host: here, the TLS
// it originates.
type DestinationRule struct {
	APIVersion string
	Metadata   Metadata
	Location   Location
	Spec       DestinationRuleSpec
}

// DestinationRuleSpec is Istio's DestinationRule spec, the subset Trellis
// serves.
type DestinationRuleSpec struct {
	Host string
	// TLS applies to every port unless PortTLS names the port.
	TLS     *ClientTLS
	PortTLS map[uint32]*ClientTLS
}

// TLS origination modes.
const (
	TLSDisable     = "DISABLE"
	TLSSimple      = "SIMPLE"
	TLSMutual      = "MUTUAL"
	TLSIstioMutual = "ISTIO_MUTUAL"
)

// ClientTLS is the TLS the sidecar originates. Relative file names are
// resolved against the directory of the resource's file.
type ClientTLS struct {
	Mode              string
	ClientCertificate string
	PrivateKey        string
	CACertificates    string
	SNI               string
	SubjectAltNames   []string
	// InsecureSkipVerify turns off server verification (Istio's field,
	// for tests only).
	InsecureSkipVerify bool
}

// For returns the TLS settings of port (nil: none): the port's own, or
// the rule's when the port's settings have no tls, as Istio merges them.
func (s *DestinationRuleSpec) For(port uint32) *ClientTLS {
	if t := s.PortTLS[port]; t != nil {
		return t
	}
	return s.TLS
}

// VirtualService, in the subset Trellis serves, sends an HTTP port of a
// ServiceEntry host to another of its ports: the shape Istio's egress TLS
// origination examples use to turn http://host:80 into TLS on 443.
type VirtualService struct {
	APIVersion string
	Metadata   Metadata
	Location   Location
	Spec       VirtualServiceSpec
}

// VirtualServiceSpec holds the port routes.
type VirtualServiceSpec struct {
	Hosts []string
	// PortRoutes maps a port the application calls to the destination's
	// host and port.
	PortRoutes []PortRoute
}

// PortRoute is one http[] entry: requests to Port go to Host:To.
type PortRoute struct {
	Port uint32
	Host string
	To   uint32
}

var (
	unsupportedServiceEntry = map[string]string{
		"addresses":        "virtual addresses come from the mesh; leave addresses out",
		"exportTo":         "a ServiceEntry is visible to the whole mesh",
		"subjectAltNames":  "set subjectAltNames in the DestinationRule's tls",
		"workloadSelector": "workload entries are not supported yet",
	}
	unsupportedDestinationRule = map[string]string{
		"subsets":          "subsets are not supported yet",
		"exportTo":         "a DestinationRule is visible to the whole mesh",
		"workloadSelector": "a DestinationRule applies to every sidecar",
	}
	unsupportedTrafficPolicy = map[string]string{
		"loadBalancer":     "load balancing is round robin; it is not configurable yet",
		"connectionPool":   "connection pools are not configurable yet",
		"outlierDetection": "outlier detection is not supported yet",
		"tunnel":           "tunnels are not supported",
		"proxyProtocol":    "the PROXY protocol is not supported",
	}
	unsupportedClientTLS = map[string]string{
		"credentialName": "give clientCertificate, privateKey and caCertificates as files",
	}
)

func (d *decoder) serviceEntrySpec(path string, v any, s *ServiceEntrySpec) {
	d.object(path, v, []field{
		{"hosts", func(p string, v any) { d.strList(p, v, &s.Hosts) }},
		{"ports", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var port ServiceEntryPort
				d.object(p, e, []field{
					{"number", func(p string, v any) { d.port(p, v, &port.Number) }},
					{"name", func(p string, v any) { d.str(p, v, &port.Name) }},
					{"protocol", func(p string, v any) { d.str(p, v, &port.Protocol) }},
					{"targetPort", func(p string, v any) { d.port(p, v, &port.TargetPort) }},
				}, nil)
				s.Ports = append(s.Ports, port)
			})
		}},
		{"location", func(p string, v any) { d.str(p, v, &s.Location) }},
		{"resolution", func(p string, v any) { d.str(p, v, &s.Resolution) }},
		{"endpoints", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var ep ServiceEntryEndpoint
				d.object(p, e, []field{
					{"address", func(p string, v any) { d.str(p, v, &ep.Address) }},
					{"ports", func(p string, v any) { d.portMap(p, v, &ep.Ports) }},
					{"labels", ignore},
				}, map[string]string{"network": "networks are not supported", "locality": "locality is not supported", "weight": "weights are not supported", "serviceAccount": "endpoints outside the mesh have no identity"})
				s.Endpoints = append(s.Endpoints, ep)
			})
		}},
	}, unsupportedServiceEntry)
}

func (d *decoder) destinationRuleSpec(path string, v any, s *DestinationRuleSpec) {
	d.object(path, v, []field{
		{"host", func(p string, v any) { d.str(p, v, &s.Host) }},
		{"trafficPolicy", func(p string, v any) {
			d.object(p, v, []field{
				{"tls", func(p string, v any) { s.TLS = d.clientTLS(p, v) }},
				{"portLevelSettings", func(p string, v any) {
					d.list(p, v, func(p string, _ int, e any) {
						var port uint32
						var tls *ClientTLS
						d.object(p, e, []field{
							{"port", func(p string, v any) {
								d.object(p, v, []field{{"number", func(p string, v any) { d.port(p, v, &port) }}}, nil)
							}},
							{"tls", func(p string, v any) { tls = d.clientTLS(p, v) }},
						}, unsupportedTrafficPolicy)
						if port == 0 {
							d.errs.add(child(p, "port.number"), "is required: the port these settings apply to")
							return
						}
						if s.PortTLS == nil {
							s.PortTLS = map[uint32]*ClientTLS{}
						}
						if _, dup := s.PortTLS[port]; dup {
							d.errs.add(child(p, "port.number"), "port %d has settings twice", port)
						}
						s.PortTLS[port] = tls
					})
				}},
			}, unsupportedTrafficPolicy)
		}},
	}, unsupportedDestinationRule)
}

func (d *decoder) clientTLS(path string, v any) *ClientTLS {
	if v == nil {
		return nil
	}
	t := &ClientTLS{}
	d.object(path, v, []field{
		{"mode", func(p string, v any) { d.str(p, v, &t.Mode) }},
		{"clientCertificate", func(p string, v any) { d.str(p, v, &t.ClientCertificate) }},
		{"privateKey", func(p string, v any) { d.str(p, v, &t.PrivateKey) }},
		{"caCertificates", func(p string, v any) { d.str(p, v, &t.CACertificates) }},
		{"sni", func(p string, v any) { d.str(p, v, &t.SNI) }},
		{"subjectAltNames", func(p string, v any) { d.strList(p, v, &t.SubjectAltNames) }},
		{"insecureSkipVerify", func(p string, v any) {
			switch b := v.(type) {
			case nil:
			case bool:
				t.InsecureSkipVerify = b
			default:
				d.errs.add(p, "must be true or false, not %s", describe(v))
			}
		}},
	}, unsupportedClientTLS)
	return t
}

func (d *decoder) virtualServiceSpec(path string, v any, s *VirtualServiceSpec) {
	const only = "Trellis serves the VirtualService subset that sends a ServiceEntry port to another port (http[].match[].port and http[].route[].destination); use a ServiceEntry port's targetPort otherwise"
	d.object(path, v, []field{
		{"hosts", func(p string, v any) { d.strList(p, v, &s.Hosts) }},
		{"http", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var ports []uint32
				var dests []PortRoute
				d.object(p, e, []field{
					{"match", func(p string, v any) {
						d.list(p, v, func(p string, _ int, e any) {
							var port uint32
							d.object(p, e, []field{{"port", func(p string, v any) { d.port(p, v, &port) }}}, map[string]string{
								"uri": only, "headers": only, "method": only, "authority": only, "queryParams": only, "sourceLabels": only, "gateways": only})
							if port == 0 {
								d.errs.add(child(p, "port"), "is required: %s", only)
							}
							ports = append(ports, port)
						})
					}},
					{"route", func(p string, v any) {
						d.list(p, v, func(p string, _ int, e any) {
							var r PortRoute
							d.object(p, e, []field{{"destination", func(p string, v any) {
								d.object(p, v, []field{
									{"host", func(p string, v any) { d.str(p, v, &r.Host) }},
									{"port", func(p string, v any) {
										d.object(p, v, []field{{"number", func(p string, v any) { d.port(p, v, &r.To) }}}, nil)
									}},
								}, map[string]string{"subset": only})
							}}}, map[string]string{"weight": only, "headers": only})
							dests = append(dests, r)
						})
					}},
					{"name", ignore},
				}, map[string]string{"rewrite": only, "redirect": only, "retries": only, "timeout": only, "fault": only, "mirror": only, "headers": only, "corsPolicy": only})
				if len(ports) != 1 || len(dests) != 1 {
					d.errs.add(p, "needs one match port and one route destination: %s", only)
					return
				}
				s.PortRoutes = append(s.PortRoutes, PortRoute{Port: ports[0], Host: dests[0].Host, To: dests[0].To})
			})
		}},
	}, map[string]string{"tcp": "only http routes are supported", "tls": "only http routes are supported", "gateways": "gateways are not supported yet", "exportTo": "a VirtualService is visible to the whole mesh"})
}

// port decodes a port number.
func (d *decoder) port(path string, v any, dst *uint32) {
	if v == nil {
		return
	}
	p, ok := portKey(v)
	if !ok {
		d.errs.add(path, "must be a port number from 1 to 65535")
		return
	}
	*dst = p
}

func (d *decoder) portMap(path string, v any, dst *map[string]uint32) {
	if v == nil {
		return
	}
	m, ok := v.(map[any]any)
	if !ok {
		d.errs.add(path, "must be a mapping of port names to numbers, not %s", describe(v))
		return
	}
	out := map[string]uint32{}
	for k, e := range m {
		ks, ok := k.(string)
		if !ok {
			d.errs.add(path, "key %v must be a port name", k)
			continue
		}
		var n uint32
		d.port(key(path, ks), e, &n)
		out[ks] = n
	}
	*dst = out
}

// Protocols a ServiceEntry port may have.
var serviceEntryProtocols = []string{"HTTP", "HTTPS", "HTTP2", "GRPC", "TLS", "TCP"}

// Validate checks a ServiceEntry alone.
func (se *ServiceEntry) Validate() (errs, warnings []*Error) {
	var fe fieldErrors
	s := &se.Spec
	if len(s.Hosts) == 0 {
		fe.add("spec.hosts", "is required: the host names the application calls, such as [api.example.com]")
	}
	for i, h := range s.Hosts {
		if err := validHost(h); err != "" {
			fe.add(index("spec.hosts", i), "%q %s", h, err)
		}
	}
	if len(s.Ports) == 0 {
		fe.add("spec.ports", "is required: the ports the application calls, such as [{number: 80, name: http, protocol: HTTP}]")
	}
	names, numbers := map[string]bool{}, map[uint32]bool{}
	for i, p := range s.Ports {
		f := index("spec.ports", i)
		if p.Number == 0 {
			fe.add(f+".number", "is required")
		}
		if numbers[p.Number] {
			fe.add(f+".number", "port %d is listed twice", p.Number)
		}
		numbers[p.Number] = true
		if p.Name == "" {
			fe.add(f+".name", "is required, such as http")
		} else if names[p.Name] {
			fe.add(f+".name", "%q is listed twice", p.Name)
		}
		names[p.Name] = true
		if !slices.Contains(serviceEntryProtocols, strings.ToUpper(p.Protocol)) {
			fe.add(f+".protocol", "%q is not one of %s", p.Protocol, strings.Join(serviceEntryProtocols, ", "))
		}
	}
	switch s.Location {
	case "", "MESH_EXTERNAL", "MESH_INTERNAL":
	default:
		fe.add("spec.location", "%q is not MESH_EXTERNAL or MESH_INTERNAL", s.Location)
	}
	switch s.Resolution {
	case "", "DNS":
		for i, ep := range s.Endpoints {
			if err := validHost(ep.Address); err != "" {
				if _, ipErr := netip.ParseAddr(ep.Address); ipErr != nil {
					fe.add(index("spec.endpoints", i)+".address", "%q %s", ep.Address, err)
				}
			}
		}
	case "STATIC":
		if len(s.Endpoints) == 0 {
			fe.add("spec.endpoints", "is required with resolution STATIC: the addresses to connect to")
		}
		for i, ep := range s.Endpoints {
			if _, err := netip.ParseAddr(ep.Address); err != nil {
				fe.add(index("spec.endpoints", i)+".address", "%q is not an IP address, which resolution STATIC needs (use resolution DNS for names)", ep.Address)
			}
		}
	case "NONE":
		fe.add("spec.resolution", "NONE is not supported: give resolution DNS, or STATIC with endpoints")
	default:
		fe.add("spec.resolution", "%q is not DNS or STATIC", s.Resolution)
	}
	for i, ep := range s.Endpoints {
		for name := range ep.Ports {
			if !names[name] {
				fe.add(index("spec.endpoints", i)+".ports", "%q is not the name of one of spec.ports", name)
			}
		}
	}
	return fe, nil
}

// validHost returns why h is not a host name a ServiceEntry can have, or "".
func validHost(h string) string {
	switch {
	case h == "":
		return "is empty"
	case strings.HasPrefix(h, "*"):
		return "is a wildcard, which is not supported yet: list the host names"
	case strings.ContainsAny(h, "/:@ "):
		return "is not a host name: give the name only, such as api.example.com"
	case strings.HasSuffix(h, "."):
		return "ends with a dot: write the name without it"
	}
	if _, err := netip.ParseAddr(h); err == nil {
		return "is an IP address, not a host name"
	}
	for _, label := range strings.Split(h, ".") {
		if err := meshid.ValidateName("host label", strings.ToLower(label)); err != nil || strings.Contains(label, ".") {
			return "is not a DNS name: use letters, digits and '-' in labels separated by dots, such as api.example.com"
		}
	}
	return ""
}

// Validate checks a DestinationRule alone.
func (dr *DestinationRule) Validate() (errs, warnings []*Error) {
	var fe fieldErrors
	s := &dr.Spec
	if s.Host == "" {
		fe.add("spec.host", "is required: the ServiceEntry host these settings are for")
	} else if err := validHost(s.Host); err != "" {
		fe.add("spec.host", "%q %s", s.Host, err)
	}
	if s.TLS == nil && len(s.PortTLS) == 0 {
		fe.add("spec.trafficPolicy", "has no tls: say how to connect, such as tls: {mode: SIMPLE}")
	}
	check := func(f string, t *ClientTLS) {
		if t == nil {
			return
		}
		switch t.Mode {
		case TLSDisable, TLSSimple, TLSIstioMutual:
			if t.ClientCertificate != "" || t.PrivateKey != "" {
				fe.add(f+".clientCertificate", "is for mode MUTUAL; mode %s sends no client certificate", t.Mode)
			}
		case TLSMutual:
			if t.ClientCertificate == "" {
				fe.add(f+".clientCertificate", "is required with mode MUTUAL: the client certificate file (PEM)")
			}
			if t.PrivateKey == "" {
				fe.add(f+".privateKey", "is required with mode MUTUAL: the client key file (PEM)")
			}
		case "":
			fe.add(f+".mode", "is required: DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL")
		default:
			fe.add(f+".mode", "%q is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL", t.Mode)
		}
		if t.Mode == TLSDisable && (t.CACertificates != "" || t.SNI != "" || len(t.SubjectAltNames) > 0) {
			fe.add(f+".mode", "is DISABLE, so caCertificates, sni and subjectAltNames would do nothing: remove them or choose SIMPLE")
		}
	}
	check("spec.trafficPolicy.tls", s.TLS)
	for port, t := range s.PortTLS {
		check(fmt.Sprintf("spec.trafficPolicy.portLevelSettings[port %d].tls", port), t)
	}
	return fe, nil
}

// resolveFiles makes the TLS files of a DestinationRule absolute, relative
// to the directory of the file it was read from.
func (dr *DestinationRule) resolveFiles() {
	dir := filepath.Dir(dr.Location.File)
	fix := func(t *ClientTLS) {
		if t == nil {
			return
		}
		for _, p := range []*string{&t.ClientCertificate, &t.PrivateKey, &t.CACertificates} {
			if *p != "" && !filepath.IsAbs(*p) && dr.Location.File != "" {
				*p = filepath.Join(dir, *p)
			}
		}
	}
	fix(dr.Spec.TLS)
	for _, t := range dr.Spec.PortTLS {
		fix(t)
	}
}

// Validate checks a VirtualService alone.
func (vs *VirtualService) Validate() (errs, warnings []*Error) {
	var fe fieldErrors
	if len(vs.Spec.Hosts) == 0 {
		fe.add("spec.hosts", "is required: the ServiceEntry host whose port is routed")
	}
	routed := map[string]int{}
	for i, r := range vs.Spec.PortRoutes {
		f := index("spec.http", i)
		k := strings.ToLower(r.Host) + ":" + fmt.Sprint(r.Port)
		if j, dup := routed[k]; dup {
			fe.add(f+".match[0].port", "port %d of %s is also routed by spec.http[%d]", r.Port, r.Host, j)
		}
		routed[k] = i
		if !slices.Contains(vs.Spec.Hosts, r.Host) {
			fe.add(f+".route[0].destination.host", "%q is not one of spec.hosts: a route sends a port of a host to another port of the same host", r.Host)
		}
		if r.To == 0 {
			fe.add(f+".route[0].destination.port.number", "is required: the port to send to")
		}
	}
	if len(vs.Spec.PortRoutes) == 0 {
		fe.add("spec.http", "is required: [{match: [{port: 80}], route: [{destination: {host: HOST, port: {number: 443}}}]}]")
	}
	return fe, nil
}

// checkNetworking checks the networking resources against each other: a
// host belongs to one ServiceEntry; a DestinationRule or VirtualService
// names a ServiceEntry host (mesh services are always mutual TLS) and its
// ports; one DestinationRule and one VirtualService per host.
func checkNetworking(set *Set) Errors {
	var errs Errors
	bad := func(loc Location, resource, field, format string, args ...any) {
		errs = append(errs, &Error{File: loc.File, Document: loc.Document, Line: loc.Line, Resource: resource, Field: field, Message: fmt.Sprintf(format, args...)})
	}
	hosts := map[string]*ServiceEntry{}
	for _, se := range set.ServiceEntries {
		for i, h := range se.Spec.Hosts {
			h = strings.ToLower(h)
			if other, dup := hosts[h]; dup {
				bad(se.Location, KindServiceEntry+" "+se.Metadata.Ref(), index("spec.hosts", i), "%s is also a host of ServiceEntry %s; a host belongs to one", h, other.Metadata.Ref())
				continue
			}
			hosts[h] = se
		}
	}
	portOf := func(se *ServiceEntry, n uint32) bool {
		return slices.ContainsFunc(se.Spec.Ports, func(p ServiceEntryPort) bool { return p.Number == n })
	}
	ruled := map[string]string{}
	for _, dr := range set.DestinationRules {
		res := KindDestinationRule + " " + dr.Metadata.Ref()
		h := strings.ToLower(dr.Spec.Host)
		se := hosts[h]
		if se == nil {
			bad(dr.Location, res, "spec.host", "%s is not a host of any ServiceEntry: add one (traffic between mesh workloads is always mutual TLS, which a DestinationRule does not change)", dr.Spec.Host)
			continue
		}
		if other, dup := ruled[h]; dup {
			bad(dr.Location, res, "spec.host", "%s already has DestinationRule %s; merge them", h, other)
		}
		ruled[h] = dr.Metadata.Ref()
		for port, t := range dr.Spec.PortTLS {
			if !portOf(se, port) {
				bad(dr.Location, res, fmt.Sprintf("spec.trafficPolicy.portLevelSettings[port %d]", port), "ServiceEntry %s has no port %d", se.Metadata.Ref(), port)
			}
			if t != nil && t.Mode == TLSIstioMutual {
				bad(dr.Location, res, fmt.Sprintf("spec.trafficPolicy.portLevelSettings[port %d].tls.mode", port), "ISTIO_MUTUAL is the mesh's own mTLS, which hosts outside the mesh cannot speak: use MUTUAL with a client certificate")
			}
		}
		if t := dr.Spec.TLS; t != nil && t.Mode == TLSIstioMutual {
			bad(dr.Location, res, "spec.trafficPolicy.tls.mode", "ISTIO_MUTUAL is the mesh's own mTLS, which hosts outside the mesh cannot speak: use MUTUAL with a client certificate")
		}
	}
	routed := map[string]string{}
	for _, vs := range set.VirtualServices {
		res := KindVirtualService + " " + vs.Metadata.Ref()
		for i, h := range vs.Spec.Hosts {
			h = strings.ToLower(h)
			if hosts[h] == nil {
				bad(vs.Location, res, index("spec.hosts", i), "%s is not a host of any ServiceEntry: Trellis routes ServiceEntry ports only", h)
				continue
			}
			if other, dup := routed[h]; dup {
				bad(vs.Location, res, index("spec.hosts", i), "%s already has VirtualService %s; merge them", h, other)
			}
			routed[h] = vs.Metadata.Ref()
		}
		for i, r := range vs.Spec.PortRoutes {
			se := hosts[strings.ToLower(r.Host)]
			if se == nil {
				continue
			}
			if !portOf(se, r.Port) {
				bad(vs.Location, res, index("spec.http", i)+".match[0].port", "ServiceEntry %s has no port %d", se.Metadata.Ref(), r.Port)
			}
			if !portOf(se, r.To) {
				bad(vs.Location, res, index("spec.http", i)+".route[0].destination.port.number", "ServiceEntry %s has no port %d", se.Metadata.Ref(), r.To)
			}
		}
	}
	return errs
}

// Gateway API (the HTTPRoute a meshed ingress gateway serves).
const (
	GatewayGroup  = "gateway.networking.k8s.io"
	KindHTTPRoute = "HTTPRoute"
)

// HTTPRoute sends requests that reach a gateway to mesh services, by host
// name and path: the subset of the Gateway API's HTTPRoute Trellis serves.
type HTTPRoute struct {
	APIVersion string
	Metadata   Metadata
	Location   Location
	Spec       HTTPRouteSpec
}

// HTTPRouteSpec is the route's gateways, host names and rules.
type HTTPRouteSpec struct {
	// Gateways are the gateway workloads (parentRefs) the route attaches
	// to, as namespace/name.
	Gateways []string
	// Hostnames the route serves; none serves every host.
	Hostnames []string
	Rules     []HTTPRouteRule
}

// HTTPRouteRule sends the requests its path matches to a backend.
type HTTPRouteRule struct {
	// Paths are the rule's matches: a prefix ("PathPrefix", the default)
	// or an exact path; none matches every path.
	Paths []HTTPPathMatch
	// Backend is the mesh service (namespace/name) and port.
	Backend     string
	BackendPort uint32
}

// HTTPPathMatch is one path match.
type HTTPPathMatch struct {
	Exact bool
	Value string
}

func (d *decoder) httpRouteSpec(path string, v any, s *HTTPRouteSpec, namespace string) {
	const only = "Trellis serves HTTPRoute's parentRefs, hostnames, and rules with path matches and one backendRef"
	d.object(path, v, []field{
		{"parentRefs", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var name, ns string
				d.object(p, e, []field{
					{"name", func(p string, v any) { d.str(p, v, &name) }},
					{"namespace", func(p string, v any) { d.str(p, v, &ns) }},
					{"group", ignore}, {"kind", ignore},
				}, map[string]string{"sectionName": only, "port": only})
				if name == "" {
					d.errs.add(child(p, "name"), "is required: the gateway workload the route attaches to")
					return
				}
				if ns == "" {
					ns = namespace
				}
				s.Gateways = append(s.Gateways, ns+"/"+name)
			})
		}},
		{"hostnames", func(p string, v any) { d.strList(p, v, &s.Hostnames) }},
		{"rules", func(p string, v any) {
			d.list(p, v, func(p string, _ int, e any) {
				var r HTTPRouteRule
				var backends int
				d.object(p, e, []field{
					{"matches", func(p string, v any) {
						d.list(p, v, func(p string, _ int, e any) {
							m := HTTPPathMatch{Value: "/"}
							d.object(p, e, []field{{"path", func(p string, v any) {
								var typ string
								d.object(p, v, []field{
									{"type", func(p string, v any) { d.str(p, v, &typ) }},
									{"value", func(p string, v any) { d.str(p, v, &m.Value) }},
								}, nil)
								switch typ {
								case "", "PathPrefix":
								case "Exact":
									m.Exact = true
								default:
									d.errs.add(child(p, "type"), "%q is not PathPrefix or Exact (RegularExpression is not supported)", typ)
								}
							}}}, map[string]string{"headers": only, "queryParams": only, "method": only})
							r.Paths = append(r.Paths, m)
						})
					}},
					{"backendRefs", func(p string, v any) {
						d.list(p, v, func(p string, _ int, e any) {
							backends++
							var name, ns string
							d.object(p, e, []field{
								{"name", func(p string, v any) { d.str(p, v, &name) }},
								{"namespace", func(p string, v any) { d.str(p, v, &ns) }},
								{"port", func(p string, v any) { d.port(p, v, &r.BackendPort) }},
								{"group", ignore}, {"kind", ignore},
							}, map[string]string{"weight": only, "filters": only})
							if ns == "" {
								ns = namespace
							}
							r.Backend = ns + "/" + name
						})
					}},
					{"name", ignore},
				}, map[string]string{"filters": only, "timeouts": only, "sessionPersistence": only, "retry": only})
				if backends != 1 {
					d.errs.add(child(p, "backendRefs"), "needs exactly one backend (a mesh service and its port): %s", only)
				}
				s.Rules = append(s.Rules, r)
			})
		}},
	}, nil)
}

// Validate checks an HTTPRoute alone; its backends are checked against the
// mesh's services by the control plane.
func (hr *HTTPRoute) Validate() (errs, warnings []*Error) {
	var fe fieldErrors
	if len(hr.Spec.Gateways) == 0 {
		fe.add("spec.parentRefs", "is required: the gateway workloads the route attaches to, such as [{name: ingress}]")
	}
	for i, h := range hr.Spec.Hostnames {
		if err := validHost(h); err != "" {
			fe.add(index("spec.hostnames", i), "%q %s", h, err)
		}
	}
	if len(hr.Spec.Rules) == 0 {
		fe.add("spec.rules", "is required: [{matches: [{path: {value: /}}], backendRefs: [{name: SERVICE, port: 80}]}]")
	}
	for i, r := range hr.Spec.Rules {
		f := index("spec.rules", i)
		for j, m := range r.Paths {
			if !strings.HasPrefix(m.Value, "/") {
				fe.add(fmt.Sprintf("%s.matches[%d].path.value", f, j), "%q must start with /", m.Value)
			}
		}
		if strings.HasSuffix(r.Backend, "/") {
			fe.add(f+".backendRefs[0].name", "is required: the mesh service")
		}
		if r.BackendPort == 0 {
			fe.add(f+".backendRefs[0].port", "is required: the service port")
		}
	}
	return fe, nil
}
