// Package meshfile reads the file `trellis up` runs: a whole mesh on one
// machine — its workloads (the programs to run, how many replicas, with a
// sidecar or not), its services, and the policy directory. It is strictly
// decoded (an unknown field is an error) and validated with messages that
// name the field and the fix.
package meshfile

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

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Isolation modes.
const (
	// IsolationNetns runs each replica in its own network namespace with
	// transparent interception (Linux, root).
	IsolationNetns = "netns"
	// IsolationProcess runs every workload as a plain process of the user
	// running up, its sidecar used as HTTP proxy and for explicit upstream
	// ports (no root, no interception).
	IsolationProcess = "process"
)

// Mesh is the mesh file.
type Mesh struct {
	APIVersion  string `yaml:"apiVersion"`
	Kind        string `yaml:"kind"`
	TrustDomain string `yaml:"trustDomain"`
	Isolation   string `yaml:"isolation"`
	Policies    string `yaml:"policies"`
	// OutboundTrafficPolicy is the mesh's policy for destinations that are
	// neither mesh services nor ServiceEntry hosts (ALLOW_ANY by default).
	OutboundTrafficPolicy *controlplane.OutboundTrafficPolicy `yaml:"outboundTrafficPolicy"`
	Workloads             []Workload                          `yaml:"workloads"`
	Services              []Service                           `yaml:"services"`

	// Dir is the directory of the file; commands and paths are relative
	// to it.
	Dir string `yaml:"-"`
}

// Workload is a program the mesh runs, with its sidecar unless Inject is
// false.
type Workload struct {
	Name           string            `yaml:"name"`
	Namespace      string            `yaml:"namespace"`
	ServiceAccount string            `yaml:"serviceAccount"`
	Labels         map[string]string `yaml:"labels"`
	Command        []string          `yaml:"command"`
	Env            map[string]string `yaml:"env"`
	Ports          []Port            `yaml:"ports"`
	Replicas       *int              `yaml:"replicas"`
	Inject         *bool             `yaml:"inject"`
	// Gateway makes the workload an ingress gateway: no program, only a
	// proxy serving these listeners to callers outside the mesh, by the
	// HTTPRoutes attached to it.
	Gateway *Gateway `yaml:"gateway"`
}

// Gateway is an ingress gateway's listeners.
type Gateway struct {
	Listeners []GatewayListener `yaml:"listeners"`
	// RouteNamespaces are the namespaces besides its own whose HTTPRoutes
	// may attach to the gateway ("*": any).
	RouteNamespaces []string `yaml:"routeNamespaces"`
}

// GatewayListener is a port a gateway serves: HTTP, or HTTPS with a
// certificate and key (PEM files, relative to the mesh file).
type GatewayListener struct {
	Port        uint32 `yaml:"port"`
	Protocol    string `yaml:"protocol"`
	Certificate string `yaml:"certificate"`
	PrivateKey  string `yaml:"privateKey"`
}

// Port is a port the workload's program listens on.
type Port struct {
	Port     uint32 `yaml:"port"`
	Protocol string `yaml:"protocol"`
}

// Service names the workloads its selector matches.
type Service struct {
	Name      string            `yaml:"name"`
	Namespace string            `yaml:"namespace"`
	Selector  map[string]string `yaml:"selector"`
	Ports     []ServicePort     `yaml:"ports"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name        string `yaml:"name"`
	Port        uint32 `yaml:"port"`
	TargetPort  uint32 `yaml:"targetPort"`
	AppProtocol string `yaml:"appProtocol"`
}

// ReplicaCount returns the number of replicas (1 unless set).
func (w Workload) ReplicaCount() int {
	if w.Replicas == nil {
		return 1
	}
	return *w.Replicas
}

// Injected reports whether the workload runs with a sidecar (the default).
func (w Workload) Injected() bool { return w.Inject == nil || *w.Inject }

// Ref returns "namespace/name".
func (w Workload) Ref() string { return w.Namespace + "/" + w.Name }

// Load reads and validates a mesh file.
func Load(path string) (*Mesh, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("mesh file: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	m, err := Parse(data, filepath.Dir(abs))
	if err != nil {
		return nil, fmt.Errorf("mesh file %s: %w", path, err)
	}
	return m, nil
}

// Parse decodes a mesh file whose directory is dir.
func Parse(data []byte, dir string) (*Mesh, error) {
	var m Mesh
	if err := yaml.UnmarshalStrict(data, &m); err != nil {
		return nil, fmt.Errorf("%s (see the fields of kind Mesh in the README)", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	m.Dir = dir
	if m.TrustDomain == "" {
		m.TrustDomain = meshid.DefaultTrustDomain
	}
	if m.Isolation == "" {
		m.Isolation = IsolationNetns
	}
	for i := range m.Workloads {
		if m.Workloads[i].ServiceAccount == "" {
			m.Workloads[i].ServiceAccount = m.Workloads[i].Name
		}
	}
	for i := range m.Services {
		for j := range m.Services[i].Ports {
			if p := &m.Services[i].Ports[j]; p.TargetPort == 0 {
				p.TargetPort = p.Port
			}
		}
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Validate reports every problem with its field path.
func (m *Mesh) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if m.APIVersion != "trellis.dev/v1" {
		bad("apiVersion", "%q is not supported: use trellis.dev/v1", m.APIVersion)
	}
	if m.Kind != "Mesh" {
		bad("kind", "%q is not supported: use Mesh", m.Kind)
	}
	if _, err := spiffeid.TrustDomainFromString(m.TrustDomain); err != nil {
		bad("trustDomain", "%q is not a trust domain such as cluster.local: %v", m.TrustDomain, err)
	}
	switch m.Isolation {
	case IsolationNetns:
	case IsolationProcess:
	default:
		bad("isolation", "%q is not one of netns, process", m.Isolation)
	}
	if m.Policies != "" {
		if fi, err := os.Stat(m.Path(m.Policies)); err != nil || !fi.IsDir() {
			bad("policies", "%s is not a directory (relative paths are relative to the mesh file)", m.Path(m.Policies))
		}
	}
	if len(m.Workloads) == 0 {
		bad("workloads", "is empty: list the programs to run")
	}
	if len(m.Workloads) > MaxWorkloads {
		bad("workloads", "has %d entries; a mesh on one machine runs at most %d", len(m.Workloads), MaxWorkloads)
	}
	seen := map[string]bool{}
	portOwner := map[uint32]string{} // process isolation: one host, one port each
	for i, w := range m.Workloads {
		f := fmt.Sprintf("workloads[%d]", i)
		if err := meshid.ValidateName("name", w.Name); err != nil {
			bad(f+".name", "%v", err)
		}
		if err := meshid.ValidateName("namespace", w.Namespace); err != nil {
			bad(f+".namespace", "%v", err)
		}
		checkLabel(bad, f+".namespace", w.Namespace)
		if err := meshid.ValidateName("service account", w.ServiceAccount); err != nil {
			bad(f+".serviceAccount", "%v", err)
		}
		if seen[w.Ref()] {
			bad(f+".name", "workload %s is listed twice", w.Ref())
		}
		seen[w.Ref()] = true
		switch {
		case w.Gateway != nil:
			checkGateway(m, w, f, bad, portOwner)
		case len(w.Command) == 0 || w.Command[0] == "":
			bad(f+".command", "is empty: give the program and its arguments, such as [\"python3\", \"-m\", \"http.server\", \"8080\"]")
		}
		if w.Replicas != nil && (*w.Replicas < 1 || *w.Replicas > 50) {
			bad(f+".replicas", "must be from 1 to 50")
		} else if m.Isolation == IsolationProcess && w.ReplicaCount() > 1 {
			bad(f+".replicas", "is %d, but under process isolation every program shares this host's ports, so a second replica could not listen: use 1, or isolation: netns", w.ReplicaCount())
		}
		for _, k := range slices.Sorted(maps.Keys(w.Env)) {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				bad(f+".env", "%q is not an environment variable name", k)
			}
		}
		ports := map[uint32]bool{}
		for j, p := range w.Ports {
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if p.Port == 0 || p.Port > 65535 {
				bad(pf+".port", "must be a port number from 1 to 65535")
			}
			if m.Isolation == IsolationNetns && reservedPort(p.Port) {
				bad(pf+".port", "%d is the sidecar's; use another port for the program", p.Port)
			}
			if m.Isolation == IsolationProcess && p.Port != 0 {
				if other, taken := portOwner[p.Port]; taken && other != w.Ref() {
					bad(pf+".port", "port %d is also %s's: under process isolation all programs listen on this host, so each needs ports of its own", p.Port, other)
				}
				portOwner[p.Port] = w.Ref()
			}
			if ports[p.Port] {
				bad(pf+".port", "port %d is listed twice", p.Port)
			}
			ports[p.Port] = true
			if p.Protocol != "" && config.ParseProtocol(p.Protocol) == config.ProtocolSniff {
				bad(pf+".protocol", "%q is not a known protocol: use http, http2, grpc, tcp, mysql (server-first), or leave it empty to detect", p.Protocol)
			}
		}
	}
	services := map[string]bool{}
	for i, s := range m.Services {
		f := fmt.Sprintf("services[%d]", i)
		if err := meshid.ValidateName("name", s.Name); err != nil {
			bad(f+".name", "%v", err)
		}
		if err := meshid.ValidateName("namespace", s.Namespace); err != nil {
			bad(f+".namespace", "%v", err)
		}
		// A service is reached as NAME.NAMESPACE: dots in either would
		// make two services one host name.
		checkLabel(bad, f+".name", s.Name)
		checkLabel(bad, f+".namespace", s.Namespace)
		key := s.Namespace + "/" + s.Name
		if services[key] {
			bad(f+".name", "service %s is listed twice", key)
		}
		services[key] = true
		if len(s.Selector) == 0 {
			bad(f+".selector", "is empty: select the workloads by labels, such as {app: %s}", s.Name)
		}
		matched := false
		for _, w := range m.Workloads {
			if s.Selects(w) {
				matched = true
				if !w.Injected() {
					bad(f+".selector", "selects %s, which runs without a sidecar (inject: false): meshed callers could not reach it; a service's workloads need sidecars", w.Ref())
				}
			}
		}
		if !matched && len(s.Selector) > 0 {
			bad(f+".selector", "matches no workload of namespace %s: check the workloads' labels", s.Namespace)
		}
		if len(s.Ports) == 0 {
			bad(f+".ports", "is empty: list at least one port, such as {name: http, port: 80, targetPort: 8080}")
		}
		for j, p := range s.Ports {
			pf := fmt.Sprintf("%s.ports[%d]", f, j)
			if p.Port == 0 || p.Port > 65535 {
				bad(pf+".port", "must be a port number from 1 to 65535")
			}
			if p.TargetPort > 65535 {
				bad(pf+".targetPort", "must be a port number from 1 to 65535")
			}
			if m.Isolation == IsolationProcess {
				// Without interception the sidecar listens only for the
				// ports a workload declares.
				for k, w := range m.Workloads {
					if s.Selects(w) && !slices.ContainsFunc(w.Ports, func(wp Port) bool { return wp.Port == p.TargetPort }) {
						bad(pf+".targetPort", "%d is not a port of %s, which the service selects: under process isolation its sidecar listens only for declared ports; add {port: %d} to workloads[%d].ports", p.TargetPort, w.Ref(), p.TargetPort, k)
					}
				}
			}
		}
	}
	if len(errs) == 0 {
		// What the control plane checks (service ports, protocols) is
		// reported now, against the mesh file, not after start.
		if err := m.ControlPlane(m.Dir, "127.0.0.1:1", "127.0.0.1:2").Validate(); err != nil {
			// Its field paths are the control plane configuration's, whose
			// workloads leave out those without sidecar.
			errs = append(errs, fmt.Errorf("the control plane configuration made from this file (workloads without sidecar listed apart): %w", err))
		}
	}
	return errors.Join(errs...)
}

func checkLabel(bad func(string, string, ...any), field, name string) {
	if strings.Contains(name, ".") {
		bad(field, "%q must not contain '.': services are reached as NAME.NAMESPACE", name)
	}
}

// checkGateway checks a gateway workload: no program, a sidecar, its
// listeners well formed and their ports free.
func checkGateway(m *Mesh, w Workload, f string, bad func(string, string, ...any), portOwner map[uint32]string) {
	if len(w.Command) > 0 {
		bad(f+".command", "a gateway runs no program of its own: remove command")
	}
	if !w.Injected() {
		bad(f+".inject", "a gateway is a proxy: it cannot run without one")
	}
	if len(w.Ports) > 0 {
		bad(f+".ports", "a gateway's ports are its listeners: remove ports")
	}
	for i, ns := range w.Gateway.RouteNamespaces {
		if ns != "*" && meshid.ValidateName("namespace", ns) != nil {
			bad(fmt.Sprintf("%s.gateway.routeNamespaces[%d]", f, i), "%q is not a namespace name (or \"*\" for any)", ns)
		}
	}
	if len(w.Gateway.Listeners) == 0 {
		bad(f+".gateway.listeners", "is empty: give at least one, such as {port: 8080, protocol: HTTP}")
	}
	seen := map[uint32]bool{}
	for i, l := range w.Gateway.Listeners {
		lf := fmt.Sprintf("%s.gateway.listeners[%d]", f, i)
		switch {
		case l.Port == 0 || l.Port > 65535:
			bad(lf+".port", "must be a port number from 1 to 65535")
		case seen[l.Port]:
			bad(lf+".port", "port %d is listed twice", l.Port)
		case m.Isolation == IsolationNetns && reservedPort(l.Port):
			bad(lf+".port", "%d is the sidecar's own; choose another", l.Port)
		}
		seen[l.Port] = true
		if m.Isolation == IsolationProcess && l.Port != 0 {
			if other, taken := portOwner[l.Port]; taken && other != w.Ref() {
				bad(lf+".port", "port %d is also %s's: under process isolation every workload needs ports of its own", l.Port, other)
			}
			portOwner[l.Port] = w.Ref()
		}
		switch l.Protocol {
		case "HTTP":
			if l.Certificate != "" || l.PrivateKey != "" {
				bad(lf+".certificate", "is for protocol HTTPS: remove it, or set protocol: HTTPS")
			}
		case "HTTPS":
			if l.Certificate == "" || l.PrivateKey == "" {
				bad(lf+".certificate", "protocol HTTPS needs certificate and privateKey: PEM files, relative to the mesh file")
			}
		default:
			bad(lf+".protocol", "%q is not HTTP or HTTPS", l.Protocol)
		}
	}
}

// reservedPort reports the ports the sidecar takes in every replica's
// network namespace.
func reservedPort(p uint32) bool {
	return p == InboundPort || p == OutboundPort || p == AdminPort || p == StatsPort
}

// MaxWorkloads bounds a mesh file's workloads (each gets a user of its
// own from a per-mesh block).
const MaxWorkloads = 256

// The sidecar's ports inside each replica's network namespace. The stats
// port (metrics only) is reachable on the replica's address, for the
// control plane to scrape; the admin port only on loopback.
const (
	InboundPort  = 15006
	OutboundPort = 15001
	AdminPort    = 15000
	StatsPort    = 15020
)

// Selects reports whether the service's selector matches the workload:
// same namespace, every selector label on the workload.
func (s Service) Selects(w Workload) bool {
	return w.Namespace == s.Namespace && registry.Selects(s.Selector, w.Labels)
}

// Path resolves p against the mesh file's directory.
func (m *Mesh) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(m.Dir, p)
}

// ServiceRange is where service virtual IPs are allocated (from its
// start), ExternalRange, its upper half, where ServiceEntry hosts'.
var (
	ServiceRange  = netip.MustParsePrefix("198.19.0.0/16")
	ExternalRange = netip.MustParsePrefix("198.19.128.0/17")
)

// ServiceAddresses gives each service a virtual IP in ServiceRange, in the
// order of the file.
func (m *Mesh) ServiceAddresses() map[string]netip.Addr {
	out := map[string]netip.Addr{}
	a := ServiceRange.Addr().Next()
	for _, s := range m.Services {
		out[s.Namespace+"/"+s.Name] = a
		a = a.Next()
	}
	return out
}

// ControlPlane returns the control plane configuration for the mesh: the
// injected workloads and the services, with their virtual IPs.
func (m *Mesh) ControlPlane(stateDir, listen, adminListen string) *controlplane.Config {
	// Replicas say goodbye when they stop; a crashed one leaves its
	// services after a short grace (a certificate renewal reconnects).
	grace := controlplane.Duration(10 * time.Second)
	c := &controlplane.Config{
		APIVersion: "trellis.dev/v1", Kind: "ControlPlane",
		TrustDomain: m.TrustDomain, StateDir: stateDir, Listen: listen, AdminListen: adminListen,
		Resources: m.Path(m.Policies), GracePeriod: &grace, OutboundTrafficPolicy: m.OutboundTrafficPolicy,
	}
	if m.Isolation == IsolationNetns {
		// Applications resolve ServiceEntry hosts in their namespace's
		// hosts file to these, which their sidecar intercepts.
		c.ExternalAddresses = ExternalRange.String()
	}
	for _, w := range m.Workloads {
		if !w.Injected() {
			c.UnmeshedWorkloads = append(c.UnmeshedWorkloads, controlplane.UnmeshedWorkload{Namespace: w.Namespace, Name: w.Name})
			continue
		}
		cw := controlplane.Workload{Namespace: w.Namespace, Name: w.Name, ServiceAccount: w.ServiceAccount, Labels: w.Labels, Gateway: w.Gateway != nil}
		if w.Gateway != nil {
			cw.RouteNamespaces = w.Gateway.RouteNamespaces
		}
		for _, p := range w.Ports {
			cw.Ports = append(cw.Ports, controlplane.WorkloadPort{Port: p.Port, Protocol: p.Protocol})
		}
		c.Workloads = append(c.Workloads, cw)
	}
	vips := m.ServiceAddresses()
	for _, s := range m.Services {
		cs := controlplane.Service{Namespace: s.Namespace, Name: s.Name, Selector: s.Selector, Address: vips[s.Namespace+"/"+s.Name].String()}
		for _, p := range s.Ports {
			cs.Ports = append(cs.Ports, controlplane.ServicePort{Name: p.Name, Port: p.Port, TargetPort: p.TargetPort, AppProtocol: p.AppProtocol})
		}
		c.Services = append(c.Services, cs)
	}
	return c
}
