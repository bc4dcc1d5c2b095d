package controlplane

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	yaml "go.yaml.in/yaml/v2"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Defaults of the control plane configuration.
const (
	DefaultListen      = "127.0.0.1:15012"
	DefaultAdminListen = "127.0.0.1:15014"
	DefaultGracePeriod = 30 * time.Second
)

// Config is the control plane's configuration file (kind: ControlPlane).
// Relative paths in it are relative to the file.
type Config struct {
	APIVersion  string `yaml:"apiVersion"`
	Kind        string `yaml:"kind"`
	TrustDomain string `yaml:"trustDomain"`
	// StateDir holds the CA, join tokens, registrations and the admin
	// credential; ".trellis" beside the file unless set.
	StateDir string `yaml:"stateDir"`
	// Listen serves proxies: the identity and discovery gRPC APIs.
	Listen string `yaml:"listen"`
	// AdminListen serves the admin API (HTTPS, bearer credential).
	AdminListen string `yaml:"adminListen"`
	// Resources is a directory of PeerAuthentication and
	// AuthorizationPolicy files, watched; none means no policy.
	Resources string `yaml:"resources"`
	// GracePeriod is how long a disconnected proxy's endpoints stay in
	// service, so a proxy restart or a network blip does not remove them;
	// 30s unless set ("0s" removes them at once).
	GracePeriod *Duration `yaml:"gracePeriod"`
	// OutboundTrafficPolicy says what sidecars do with traffic to a
	// destination that is neither a mesh service nor a ServiceEntry host:
	// pass it through (ALLOW_ANY, the default) or refuse it
	// (REGISTRY_ONLY), as Istio's mesh setting of that name.
	OutboundTrafficPolicy *OutboundTrafficPolicy `yaml:"outboundTrafficPolicy"`
	// ExternalAddresses, a CIDR, gives each ServiceEntry host a virtual IP
	// that sidecars route by, for applications that resolve host names to
	// addresses the sidecar intercepts (trellis up's network namespaces).
	ExternalAddresses string     `yaml:"externalAddresses"`
	Workloads         []Workload `yaml:"workloads"`
	Services          []Service  `yaml:"services"`
	// UnmeshedWorkloads run without a sidecar: no proxy registers as
	// them, and traffic views list them as not meshed, so that operators
	// see what the mesh does not secure yet.
	UnmeshedWorkloads []UnmeshedWorkload `yaml:"unmeshedWorkloads"`
}

// UnmeshedWorkload names a workload that runs without a sidecar.
type UnmeshedWorkload struct {
	Namespace string `yaml:"namespace"`
	Name      string `yaml:"name"`
}

// OutboundTrafficPolicy is the mesh's policy for unknown destinations.
type OutboundTrafficPolicy struct {
	Mode string `yaml:"mode"` // ALLOW_ANY or REGISTRY_ONLY
}

// externalRange is ExternalAddresses parsed (zero when unset or invalid:
// Validate reports it).
func (c *Config) externalRange() netip.Prefix {
	p, _ := netip.ParsePrefix(c.ExternalAddresses)
	return p
}

// RegistryOnly reports whether unknown destinations are refused.
func (c *Config) RegistryOnly() bool {
	return c.OutboundTrafficPolicy != nil && c.OutboundTrafficPolicy.Mode == "REGISTRY_ONLY"
}

// Duration is a time.Duration written as "30s", "2m".
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if err := unmarshal(&s); err != nil {
		return fmt.Errorf("a duration is written as a string such as \"30s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration such as \"30s\" or \"2m\"", s)
	}
	*d = Duration(v)
	return nil
}

// Workload declares a workload proxies may register as.
type Workload struct {
	Namespace      string            `yaml:"namespace"`
	Name           string            `yaml:"name"`
	ServiceAccount string            `yaml:"serviceAccount"`
	Labels         map[string]string `yaml:"labels"`
	Ports          []WorkloadPort    `yaml:"ports"`
	// Gateway marks an ingress gateway: HTTPRoutes attach to it, from its
	// own namespace and RouteNamespaces ("*": any), as the Gateway API's
	// allowedRoutes.
	Gateway         bool     `yaml:"gateway"`
	RouteNamespaces []string `yaml:"routeNamespaces"`
}

// WorkloadPort is a port the workload listens on.
type WorkloadPort struct {
	Port     uint32 `yaml:"port"`
	Protocol string `yaml:"protocol"`
}

// Service is a name for the workloads its selector matches, as a
// Kubernetes Service.
type Service struct {
	Namespace string            `yaml:"namespace"`
	Name      string            `yaml:"name"`
	Selector  map[string]string `yaml:"selector"`
	// Address is the virtual IP applications dial under transparent
	// interception; optional otherwise.
	Address string        `yaml:"address"`
	Ports   []ServicePort `yaml:"ports"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name        string `yaml:"name"`
	Port        uint32 `yaml:"port"`
	TargetPort  uint32 `yaml:"targetPort"`
	AppProtocol string `yaml:"appProtocol"`
}

// LoadConfig reads, strictly decodes, defaults and validates a
// configuration file.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("control plane config: %w", err)
	}
	c, err := ParseConfig(data, filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("control plane config %s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes a configuration; relative paths are resolved against
// dir.
func ParseConfig(data []byte, dir string) (*Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, fmt.Errorf("%s (fields are listed in the documentation of kind ControlPlane)", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	c.setDefaults(dir)
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) setDefaults(dir string) {
	if c.TrustDomain == "" {
		c.TrustDomain = meshid.DefaultTrustDomain
	}
	if c.StateDir == "" {
		c.StateDir = ".trellis"
	}
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	c.StateDir = abs(c.StateDir)
	c.Resources = abs(c.Resources)
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.AdminListen == "" {
		c.AdminListen = DefaultAdminListen
	}
	if c.GracePeriod == nil {
		d := Duration(DefaultGracePeriod)
		c.GracePeriod = &d
	}
	for i := range c.Services {
		for j := range c.Services[i].Ports {
			if p := &c.Services[i].Ports[j]; p.TargetPort == 0 {
				p.TargetPort = p.Port
			}
		}
	}
}

// Validate reports every problem with its field path and what to do.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.APIVersion != "trellis.dev/v1" {
		bad("apiVersion", "%q is not supported: use trellis.dev/v1", c.APIVersion)
	}
	if c.Kind != "ControlPlane" {
		bad("kind", "%q is not supported: use ControlPlane", c.Kind)
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		bad("trustDomain", "%q is not a trust domain such as cluster.local: %v", c.TrustDomain, err)
	}
	for _, l := range []struct{ field, addr string }{{"listen", c.Listen}, {"adminListen", c.AdminListen}} {
		if _, err := netip.ParseAddrPort(l.addr); err != nil {
			bad(l.field, "%q is not an ip:port address such as 127.0.0.1:15012", l.addr)
		}
	}
	if c.Listen == c.AdminListen && !strings.HasSuffix(c.Listen, ":0") {
		bad("adminListen", "is the same address as listen; give each its own port")
	}
	if c.ExternalAddresses != "" {
		if p, err := netip.ParsePrefix(c.ExternalAddresses); err != nil || !p.Addr().Is4() || p.Bits() > 30 {
			bad("externalAddresses", "%q is not an IPv4 CIDR with room for hosts, such as 198.19.128.0/17", c.ExternalAddresses)
		} else {
			for i, s := range c.Services {
				if a, err := netip.ParseAddr(s.Address); err == nil && p.Contains(a) {
					bad(fmt.Sprintf("services[%d].address", i), "%s is inside externalAddresses %s, which ServiceEntry hosts take", a, p)
				}
			}
		}
	}
	if p := c.OutboundTrafficPolicy; p != nil && p.Mode != "ALLOW_ANY" && p.Mode != "REGISTRY_ONLY" {
		bad("outboundTrafficPolicy.mode", "%q is not ALLOW_ANY or REGISTRY_ONLY", p.Mode)
	}
	if c.GracePeriod != nil && *c.GracePeriod < 0 {
		bad("gracePeriod", "must not be negative")
	}
	workloads := map[string]*Workload{}
	for i := range c.Workloads {
		w := &c.Workloads[i]
		f := fmt.Sprintf("workloads[%d]", i)
		nameErr := checkNames(bad, f, w.Namespace, w.Name)
		if err := meshid.ValidateName("service account", w.ServiceAccount); err != nil {
			bad(f+".serviceAccount", "%v", err)
		}
		if w.Namespace == meshid.RootNamespace && w.ServiceAccount == meshid.ControlPlaneServiceAccount {
			bad(f+".serviceAccount", "%s is the control plane's own identity; choose another service account", meshid.ControlPlaneServiceAccount)
		}
		checkLabels(bad, f+".labels", w.Labels)
		if !nameErr {
			key := w.Namespace + "/" + w.Name
			if _, dup := workloads[key]; dup {
				bad(f+".name", "workload %s is declared twice", key)
			}
			workloads[key] = w
		}
		seen := map[uint32]bool{}
		for j, p := range w.Ports {
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if p.Port == 0 || p.Port > 65535 {
				bad(pf+".port", "must be a port number from 1 to 65535")
			}
			if seen[p.Port] {
				bad(pf+".port", "port %d is listed twice", p.Port)
			}
			seen[p.Port] = true
			checkProtocol(bad, pf+".protocol", p.Protocol)
		}
	}
	for i, w := range c.UnmeshedWorkloads {
		f := fmt.Sprintf("unmeshedWorkloads[%d]", i)
		if !checkNames(bad, f, w.Namespace, w.Name) {
			key := w.Namespace + "/" + w.Name
			if _, dup := workloads[key]; dup {
				bad(f+".name", "workload %s is declared twice (a workload runs with a sidecar or without)", key)
			}
			workloads[key] = nil
		}
	}
	services := map[string]bool{}
	vips := map[netip.Addr]string{}
	for i := range c.Services {
		s := &c.Services[i]
		f := fmt.Sprintf("services[%d]", i)
		if !checkNames(bad, f, s.Namespace, s.Name) {
			key := s.Namespace + "/" + s.Name
			if services[key] {
				bad(f+".name", "service %s is declared twice", key)
			}
			services[key] = true
		}
		if len(s.Selector) == 0 {
			bad(f+".selector", "is empty: a service selects its workloads by labels, such as {app: %s}", s.Name)
		}
		checkLabels(bad, f+".selector", s.Selector)
		if s.Address != "" {
			if a, err := netip.ParseAddr(s.Address); err != nil {
				bad(f+".address", "%q is not an IP address such as 198.18.128.1", s.Address)
			} else if prev, dup := vips[a]; dup {
				bad(f+".address", "%s is also the address of service %s", a, prev)
			} else {
				vips[a] = s.Namespace + "/" + s.Name
			}
		}
		if len(s.Ports) == 0 {
			bad(f+".ports", "is empty: list at least one port, such as {name: http, port: 80, targetPort: 8080}")
		}
		seen := map[uint32]bool{}
		names := map[string]bool{}
		for j, p := range s.Ports {
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if p.Port == 0 || p.Port > 65535 {
				bad(pf+".port", "must be a port number from 1 to 65535")
			}
			if p.TargetPort > 65535 {
				bad(pf+".targetPort", "must be a port number from 1 to 65535")
			}
			if seen[p.Port] {
				bad(pf+".port", "port %d is listed twice", p.Port)
			}
			seen[p.Port] = true
			if p.Name != "" && names[p.Name] {
				bad(pf+".name", "%q is listed twice", p.Name)
			}
			names[p.Name] = true
			checkProtocol(bad, pf+".appProtocol", p.AppProtocol)
		}
	}
	return errors.Join(errs...)
}

// checkNames validates a namespace and name pair, reporting whether either
// was bad.
func checkNames(bad func(string, string, ...any), f, namespace, name string) bool {
	failed := false
	if err := meshid.ValidateName("namespace", namespace); err != nil {
		bad(f+".namespace", "%v", err)
		failed = true
	}
	if err := meshid.ValidateName("name", name); err != nil {
		bad(f+".name", "%v", err)
		failed = true
	}
	return failed
}

func checkLabels(bad func(string, string, ...any), f string, labels map[string]string) {
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if k == "" {
			bad(f, "a label key is empty")
		}
	}
}

func checkProtocol(bad func(string, string, ...any), f, p string) {
	if p != "" && config.ParseProtocol(p) == config.ProtocolSniff {
		bad(f, "%q is not a known protocol: use http, http2, grpc, tcp, mysql (server-first), or leave it empty to detect", p)
	}
}

// Registry returns the declared workloads and services in the registry's
// terms.
func (c *Config) Registry() registry.Declarations {
	var d registry.Declarations
	for _, w := range c.Workloads {
		rw := registry.Workload{Namespace: w.Namespace, Name: w.Name, ServiceAccount: w.ServiceAccount, Labels: w.Labels}
		for _, p := range w.Ports {
			rw.Ports = append(rw.Ports, registry.WorkloadPort{Port: p.Port, Protocol: string(config.ParseProtocol(p.Protocol))})
		}
		d.Workloads = append(d.Workloads, rw)
	}
	for _, s := range c.Services {
		rs := registry.Service{Namespace: s.Namespace, Name: s.Name, Selector: s.Selector, Address: s.Address}
		for _, p := range s.Ports {
			proto := config.ParseProtocol(p.AppProtocol)
			if proto == config.ProtocolSniff {
				proto = config.ParseProtocol(p.Name)
			}
			rs.Ports = append(rs.Ports, registry.ServicePort{Name: p.Name, Port: p.Port, TargetPort: p.TargetPort, Protocol: string(proto)})
		}
		d.Services = append(d.Services, rs)
	}
	return d
}
