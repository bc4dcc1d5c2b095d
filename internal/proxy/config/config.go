// Package config is the proxy's configuration: which workload it stands
// beside, where it listens for inbound (mesh) and outbound (application)
// traffic, which destinations exist and which identity each endpoint must
// present. A static file supplies it for tests, benchmarks and hand-run
// sidecars; a control plane pushes destinations in the same shape
// (Outbound), checked by the same rules (ValidateOutbound).
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	yaml "go.yaml.in/yaml/v2"

	"github.com/trellis-mesh/trellis/internal/meshid"
)

// Protocol is how the proxy handles a port's traffic.
type Protocol string

// Protocols. An empty protocol is sniffed from the first bytes.
const (
	ProtocolSniff       Protocol = ""
	ProtocolHTTP        Protocol = "http"
	ProtocolHTTP2       Protocol = "http2" // prior-knowledge h2c to the app
	ProtocolGRPC        Protocol = "grpc"
	ProtocolTCP         Protocol = "tcp"
	ProtocolServerFirst Protocol = "server-first" // MySQL, MariaDB, SMTP…: the server greets first
)

// IsHTTP reports whether requests on the port are parsed and authorized one
// by one.
func (p Protocol) IsHTTP() bool {
	return p == ProtocolHTTP || p == ProtocolHTTP2 || p == ProtocolGRPC
}

// ParseProtocol accepts a declared protocol as Kubernetes writes it, either
// as appProtocol or as the prefix of a port name ("http-web", "grpc",
// "mysql-main"). Unknown names mean sniffing.
func ParseProtocol(s string) Protocol {
	name, _, _ := strings.Cut(strings.ToLower(s), "-")
	switch name {
	case "http", "http1", "http/1.1":
		return ProtocolHTTP
	case "http2", "h2c", "kubernetes.io/h2c":
		return ProtocolHTTP2
	case "grpc", "grpc-web":
		return ProtocolGRPC
	case "tcp", "tls", "https", "redis", "mongo":
		return ProtocolTCP
	case "mysql", "mariadb", "server-first", "smtp", "postgres", "postgresql":
		return ProtocolServerFirst
	}
	return ProtocolSniff
}

// Config is the proxy's whole configuration.
type Config struct {
	APIVersion string   `yaml:"apiVersion" json:"apiVersion,omitempty"`
	Kind       string   `yaml:"kind" json:"kind,omitempty"`
	Workload   Workload `yaml:"workload" json:"workload,omitempty"`
	// AppHost is where the application listens; 127.0.0.1 unless set.
	AppHost  string     `yaml:"appHost" json:"appHost,omitempty"`
	Inbound  []Inbound  `yaml:"inbound" json:"inbound,omitempty"`
	Outbound []Outbound `yaml:"outbound" json:"outbound,omitempty"`
	// Transparent, when set, adds the listeners that iptables REDIRECT
	// rules send intercepted traffic to.
	Transparent *Transparent `yaml:"transparent" json:"transparent,omitempty"`
	// HTTPProxy, when set, is a listener the application uses as its HTTP
	// proxy (HTTP_PROXY) where nothing intercepts its traffic: a request
	// for a mesh service's name (name.namespace[.svc[.cluster.local]]) goes
	// through the mesh, anything else passes through; CONNECT too.
	HTTPProxy string `yaml:"httpProxy" json:"httpProxy,omitempty"`
	// Gateway, when set, makes the proxy an ingress gateway: it serves
	// requests from outside the mesh on its listeners and sends them, by
	// the HTTPRoutes the control plane pushes, to mesh services over mTLS
	// with its own identity.
	Gateway *Gateway `yaml:"gateway" json:"gateway,omitempty"`
	// Policies is a directory of PeerAuthentication and
	// AuthorizationPolicy files; without it every port is PERMISSIVE and
	// every caller allowed, as in a mesh with no policy.
	Policies string `yaml:"policies" json:"policies,omitempty"`
	// AppProbes are the application's HTTP health checks, keyed
	// "container/kind" (kind: livez, readyz or startupz), which the proxy
	// answers at /app-health/container/kind on its stats listener by
	// calling the application on loopback. Kubernetes injection moves the
	// kubelet's probes there: arriving in plaintext from outside, they
	// would be refused by a STRICT port.
	AppProbes map[string]AppProbe `yaml:"appProbes" json:"appProbes,omitempty"`
}

// AppProbe is one application health check.
type AppProbe struct {
	Port    uint32            `yaml:"port" json:"port"`
	Path    string            `yaml:"path" json:"path"`
	Scheme  string            `yaml:"scheme" json:"scheme,omitempty"` // HTTP (default) or HTTPS
	Headers map[string]string `yaml:"headers" json:"headers,omitempty"`
}

// AppProbeKinds are the kinds of AppProbes keys.
var AppProbeKinds = []string{"livez", "readyz", "startupz"}

// Gateway is an ingress gateway's listeners.
type Gateway struct {
	Listeners []GatewayListener `yaml:"listeners" json:"listeners"`
}

// GatewayListener is a port the gateway serves: HTTP, or HTTPS with a
// certificate and key from files (read again when they change).
type GatewayListener struct {
	Listen      string `yaml:"listen" json:"listen"`
	Protocol    string `yaml:"protocol" json:"protocol"` // HTTP or HTTPS
	Certificate string `yaml:"certificate" json:"certificate,omitempty"`
	PrivateKey  string `yaml:"privateKey" json:"privateKey,omitempty"`
}

// Workload identifies the workload the proxy serves, for policy selection.
type Workload struct {
	Namespace string            `yaml:"namespace" json:"namespace,omitempty"`
	Name      string            `yaml:"name" json:"name,omitempty"`
	Labels    map[string]string `yaml:"labels" json:"labels,omitempty"`
}

// Transparent names the listeners of transparent interception: all inbound
// TCP to the workload is redirected to Inbound, all outbound TCP from it to
// Outbound, and the original destination says where it was going.
type Transparent struct {
	Inbound  string `yaml:"inbound" json:"inbound,omitempty"`
	Outbound string `yaml:"outbound" json:"outbound,omitempty"`
	// Bypass is how the proxy's own connections escape the redirection:
	// BypassMark (the default) marks their sockets, which needs
	// CAP_NET_ADMIN; BypassUID relies on the rules exempting the proxy's
	// user, so the proxy needs no capability (Kubernetes injection).
	Bypass string `yaml:"bypass" json:"bypass,omitempty"`
}

// Ways of bypassing interception.
const (
	BypassMark = "mark"
	BypassUID  = "uid"
)

// MarksSockets reports whether the proxy must mark its sockets.
func (t *Transparent) MarksSockets() bool { return t != nil && t.Bypass != BypassUID }

// Inbound is a workload port: a listener of its own, or (without listen) a
// port reached through the transparent inbound listener.
type Inbound struct {
	Listen string `yaml:"listen" json:"listen,omitempty"`
	// AppPort is the workload port traffic is forwarded to and policies
	// are evaluated for.
	AppPort  uint32   `yaml:"appPort" json:"appPort,omitempty"`
	Protocol Protocol `yaml:"protocol" json:"protocol,omitempty"`
}

// Outbound is one destination service port the application calls: on a
// listener of its own, and/or, under transparent interception, at the
// addresses (virtual IP and port) the application dials. The control plane
// pushes destinations in the same shape, without listen.
type Outbound struct {
	Listen    string   `yaml:"listen" json:"listen,omitempty"`
	Addresses []string `yaml:"addresses" json:"addresses,omitempty"`
	// Service names the destination, "name.namespace".
	Service string `yaml:"service" json:"service,omitempty"`
	// Port is the service port. It is needed only to tell apart the ports
	// of a service the control plane sends several of: a listener follows
	// the pushed destination of its service and port (0 matches a
	// service's only one).
	Port     uint32   `yaml:"port" json:"port,omitempty"`
	Protocol Protocol `yaml:"protocol" json:"protocol,omitempty"`
	// Endpoints may be empty when a control plane supplies them: until it
	// sends some (and whenever the service has no ready instance), requests
	// get 503 and TCP connections are closed.
	Endpoints []Endpoint `yaml:"endpoints" json:"endpoints,omitempty"`
	// External marks a destination outside the mesh: Service is its host
	// name, its endpoints have no identity (their addresses may be host
	// names), and TLS is what the proxy originates (nil: plain).
	External bool          `yaml:"external" json:"external,omitempty"`
	TLS      *OriginateTLS `yaml:"tls" json:"tls,omitempty"`
}

// OriginateTLS is the TLS the proxy originates to an external destination.
type OriginateTLS struct {
	Mode               string   `yaml:"mode" json:"mode"` // DISABLE, SIMPLE or MUTUAL
	ClientCertificate  string   `yaml:"clientCertificate" json:"clientCertificate,omitempty"`
	PrivateKey         string   `yaml:"privateKey" json:"privateKey,omitempty"`
	CACertificates     string   `yaml:"caCertificates" json:"caCertificates,omitempty"`
	SNI                string   `yaml:"sni" json:"sni,omitempty"`
	SubjectAltNames    []string `yaml:"subjectAltNames" json:"subjectAltNames,omitempty"`
	InsecureSkipVerify bool     `yaml:"insecureSkipVerify" json:"insecureSkipVerify,omitempty"`
}

// Endpoint is one instance of a destination and the identity it must prove.
type Endpoint struct {
	Address  string `yaml:"address" json:"address,omitempty"`
	Identity string `yaml:"identity" json:"identity,omitempty"`
}

// Load reads and validates a configuration file. A workload without a
// namespace is in namespace (the proxy's --namespace: the file Kubernetes
// injection writes does not know it); one in another namespace is an error.
func Load(path, namespace string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	c, err := parse(data, namespace)
	if err != nil {
		return nil, fmt.Errorf("proxy config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes a configuration strictly (an unknown field is an error) and
// validates it.
func Parse(data []byte) (*Config, error) { return parse(data, "") }

// ParseIn is Parse for a proxy of namespace, as Load.
func ParseIn(data []byte, namespace string) (*Config, error) { return parse(data, namespace) }

func parse(data []byte, namespace string) (*Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, err
	}
	switch {
	case namespace == "":
	case c.Workload.Namespace == "":
		c.Workload.Namespace = namespace
	case c.Workload.Namespace != namespace:
		return nil, fmt.Errorf("workload.namespace: %q, but the proxy's identity is of namespace %q (--namespace): a proxy serves a workload of its own namespace", c.Workload.Namespace, namespace)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Validate checks the configuration and fills defaults. Every problem is
// reported with its field path.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.APIVersion != "trellis.dev/v1" {
		bad("apiVersion", "%q is not supported: use trellis.dev/v1", c.APIVersion)
	}
	if c.Kind != "ProxyConfig" {
		bad("kind", "%q is not supported: use ProxyConfig", c.Kind)
	}
	if err := meshid.ValidateName("namespace", c.Workload.Namespace); err != nil {
		bad("workload.namespace", "%v", err)
	}
	if err := meshid.ValidateName("name", c.Workload.Name); err != nil {
		bad("workload.name", "%v", err)
	}
	if c.AppHost == "" {
		c.AppHost = "127.0.0.1"
	} else if _, err := netip.ParseAddr(c.AppHost); err != nil {
		bad("appHost", "%q is not an IP address", c.AppHost)
	}
	listens := map[string]string{}
	checkListen := func(field, addr string) {
		if _, err := netip.ParseAddrPort(addr); err != nil {
			bad(field, "%q is not an ip:port address such as 127.0.0.1:15006", addr)
			return
		}
		if prev, dup := listens[addr]; dup {
			bad(field, "%s is also %s", addr, prev)
		}
		listens[addr] = field
	}
	if t := c.Transparent; t != nil {
		if t.Inbound != "" {
			checkListen("transparent.inbound", t.Inbound)
		}
		if t.Outbound != "" {
			checkListen("transparent.outbound", t.Outbound)
		}
		switch t.Bypass {
		case "":
			t.Bypass = BypassMark
		case BypassMark, BypassUID:
		default:
			bad("transparent.bypass", "%q is not %s (the proxy marks its sockets) or %s (the rules exempt the proxy's user)", t.Bypass, BypassMark, BypassUID)
		}
	}
	if c.HTTPProxy != "" {
		checkListen("httpProxy", c.HTTPProxy)
	}
	for key, p := range c.AppProbes {
		f := "appProbes[" + key + "]"
		container, kind, ok := strings.Cut(key, "/")
		if !ok || container == "" || !slices.Contains(AppProbeKinds, kind) {
			bad(f, "the key must be container/kind, kind one of %s", strings.Join(AppProbeKinds, ", "))
		}
		if p.Port == 0 || p.Port > 65535 {
			bad(f+".port", "must be a port number from 1 to 65535")
		}
		if !strings.HasPrefix(p.Path, "/") {
			bad(f+".path", "%q must start with /", p.Path)
		}
		if p.Scheme != "" && p.Scheme != "HTTP" && p.Scheme != "HTTPS" {
			bad(f+".scheme", "%q is not HTTP or HTTPS", p.Scheme)
		}
	}
	if g := c.Gateway; g != nil {
		if len(g.Listeners) == 0 {
			bad("gateway.listeners", "is empty: give at least one, such as {listen: \"0.0.0.0:8080\", protocol: HTTP}")
		}
		for i, l := range g.Listeners {
			f := fmt.Sprintf("gateway.listeners[%d]", i)
			checkListen(f+".listen", l.Listen)
			switch l.Protocol {
			case "HTTP":
				if l.Certificate != "" || l.PrivateKey != "" {
					bad(f+".certificate", "is for protocol HTTPS: remove it, or set protocol: HTTPS")
				}
			case "HTTPS":
				if l.Certificate == "" || l.PrivateKey == "" {
					bad(f+".certificate", "protocol HTTPS needs certificate and privateKey (PEM files)")
				}
			default:
				bad(f+".protocol", "%q is not HTTP or HTTPS", l.Protocol)
			}
		}
	}
	transparentIn := c.Transparent != nil && c.Transparent.Inbound != ""
	transparentOut := c.Transparent != nil && c.Transparent.Outbound != ""
	ports := map[uint32]bool{}
	for i, in := range c.Inbound {
		f := fmt.Sprintf("inbound[%d]", i)
		switch {
		case in.Listen != "":
			checkListen(f+".listen", in.Listen)
		case !transparentIn:
			bad(f+".listen", "is required unless transparent.inbound is set")
		}
		if ports[in.AppPort] {
			bad(f+".appPort", "port %d is listed twice", in.AppPort)
		}
		ports[in.AppPort] = true
		if in.AppPort == 0 || in.AppPort > 65535 {
			bad(f+".appPort", "must be a port number from 1 to 65535")
		}
		if err := normalizeProtocol(&c.Inbound[i].Protocol); err != nil {
			bad(f+".protocol", "%v", err)
		}
	}
	for i, out := range c.Outbound {
		f := fmt.Sprintf("outbound[%d]", i)
		if out.Listen != "" {
			checkListen(f+".listen", out.Listen)
		} else if len(out.Addresses) == 0 {
			bad(f+".listen", "is required unless addresses (for transparent interception) are given")
		}
		for j := range out.Addresses {
			if !transparentOut {
				bad(fmt.Sprintf("%s.addresses[%d]", f, j), "needs transparent.outbound: only intercepted traffic has an original destination")
			}
		}
	}
	if err := ValidateOutbound(c.Outbound, func(i int) string { return fmt.Sprintf("outbound[%d]", i) }); err != nil {
		errs = append(errs, err)
	}
	if len(c.Inbound)+len(c.Outbound) == 0 && c.Transparent == nil && c.HTTPProxy == "" && c.Gateway == nil {
		bad("inbound", "no inbound or outbound listener: the proxy would do nothing")
	}
	return errors.Join(errs...)
}

// ValidateOutbound checks destinations by the rules both of their sources
// obey — the configuration file's outbound entries and the destinations a
// control plane pushes — so that neither can hold what the other would
// refuse: a service named "name.namespace", a known protocol (normalized in
// place, as Validate does), ip:port addresses that no two destinations
// share, and endpoints with an ip:port address and a SPIFFE ID, one
// identity per address however many destinations list it. An empty list of
// endpoints is valid: a service may have no ready instance. Listeners are
// left to the caller, as only the file has them. field(i) names outs[i] in
// messages, such as "outbound[3]".
func ValidateOutbound(outs []Outbound, field func(i int) string) error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	// Addresses are compared as the proxy matches original destinations:
	// an IPv4-mapped IPv6 address is the IPv4 address.
	canonical := func(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) }
	addrs := map[netip.AddrPort]string{}
	endpointIDs := map[netip.AddrPort]string{}
	for i, out := range outs {
		f := field(i)
		for j, a := range out.Addresses {
			af := fmt.Sprintf("%s.addresses[%d]", f, j)
			if ap, err := netip.ParseAddrPort(a); err != nil {
				bad(af, "%q is not an ip:port address such as 198.18.128.1:80", a)
			} else if prev, dup := addrs[canonical(ap)]; dup {
				bad(af, "%s is also %s", a, prev)
			} else {
				addrs[canonical(ap)] = af
			}
		}
		if err := normalizeProtocol(&outs[i].Protocol); err != nil {
			bad(f+".protocol", "%v", err)
		}
		if out.External {
			validateExternal(out, f, bad)
			continue
		}
		if out.TLS != nil {
			bad(f+".tls", "is for external destinations: mesh destinations are always mutual TLS")
		}
		if name, ns, ok := strings.Cut(out.Service, "."); !ok || meshid.ValidateName("service", name) != nil || meshid.ValidateName("namespace", ns) != nil {
			bad(f+".service", "%q is not of the form name.namespace", out.Service)
		}
		if out.Port > 65535 {
			bad(f+".port", "must be a port number from 1 to 65535, or 0 for a service's only port")
		}
		for j, ep := range out.Endpoints {
			ef := fmt.Sprintf("%s.endpoints[%d]", f, j)
			ap, addrErr := netip.ParseAddrPort(ep.Address)
			if addrErr != nil {
				bad(ef+".address", "%q is not an ip:port address", ep.Address)
			}
			if _, err := spiffeid.FromString(ep.Identity); err != nil {
				bad(ef+".identity", "%q is not a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA: %v", ep.Identity, err)
				continue
			}
			if addrErr != nil {
				continue
			}
			if prev, ok := endpointIDs[canonical(ap)]; ok && prev != ep.Identity {
				bad(ef+".identity", "%s is also listed with identity %s; one endpoint has one identity", ep.Address, prev)
				continue
			}
			endpointIDs[canonical(ap)] = ep.Identity
		}
	}
	return errors.Join(errs...)
}

// normalizeProtocol accepts a protocol written as Kubernetes names them
// (appProtocol or a port-name prefix: "mysql", "redis", "h2c",
// "grpc-web"…) and stores the handling it implies. A name nothing
// recognises is an error rather than silent sniffing, so a typo is caught.
func normalizeProtocol(p *Protocol) error {
	switch *p {
	case ProtocolSniff, ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolTCP, ProtocolServerFirst:
		return nil
	}
	if parsed := ParseProtocol(string(*p)); parsed != ProtocolSniff {
		*p = parsed
		return nil
	}
	return fmt.Errorf("%q is not one of http, http2, grpc, tcp, server-first (or a Kubernetes name such as mysql, redis, h2c; empty to sniff)", *p)
}

// ListenAddrs returns the address of every listener the configuration
// opens.
func (c *Config) ListenAddrs() []string {
	var out []string
	for _, in := range c.Inbound {
		if in.Listen != "" {
			out = append(out, in.Listen)
		}
	}
	for _, o := range c.Outbound {
		if o.Listen != "" {
			out = append(out, o.Listen)
		}
	}
	if t := c.Transparent; t != nil {
		for _, a := range []string{t.Inbound, t.Outbound} {
			if a != "" {
				out = append(out, a)
			}
		}
	}
	if c.HTTPProxy != "" {
		out = append(out, c.HTTPProxy)
	}
	if g := c.Gateway; g != nil {
		for _, l := range g.Listeners {
			out = append(out, l.Listen)
		}
	}
	return out
}

// validateExternal checks a destination outside the mesh: a host name,
// endpoints at host:port without identity, and a TLS mode the proxy can
// originate.
func validateExternal(out Outbound, f string, bad func(string, string, ...any)) {
	if out.Service == "" || strings.ContainsAny(out.Service, "/:@ ") {
		bad(f+".service", "%q is not a host name", out.Service)
	}
	if out.Port == 0 || out.Port > 65535 {
		bad(f+".port", "must be a port number from 1 to 65535")
	}
	for j, ep := range out.Endpoints {
		ef := fmt.Sprintf("%s.endpoints[%d]", f, j)
		host, port, err := net.SplitHostPort(ep.Address)
		if err != nil || host == "" || port == "" || port == "0" {
			bad(ef+".address", "%q is not host:port", ep.Address)
		}
		if ep.Identity != "" {
			bad(ef+".identity", "must be empty: an endpoint outside the mesh has no mesh identity")
		}
	}
	if t := out.TLS; t != nil {
		switch t.Mode {
		case "DISABLE", "SIMPLE":
		case "MUTUAL":
			if t.ClientCertificate == "" || t.PrivateKey == "" {
				bad(f+".tls", "mode MUTUAL needs clientCertificate and privateKey")
			}
		default:
			bad(f+".tls.mode", "%q is not DISABLE, SIMPLE or MUTUAL", t.Mode)
		}
	}
}
