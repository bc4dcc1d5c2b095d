package localrun

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshfile"
)

// processPlacement runs every workload as a plain process of the user
// running up, on this host's loopback: no root, no interception. A
// program reaches services through its sidecar, by name with the sidecar
// as its HTTP proxy (HTTP_PROXY) or on upstream ports of its own (named in
// its environment the way Kubernetes names service variables); the
// sidecar's inbound listeners are where peers reach it. What it cannot
// give: a program can still dial another's port directly, bypassing both
// sidecars, and every program can read what its user can.
type processPlacement struct {
	stateDir string
	mesh     *meshfile.Mesh // nil when only cleaning up
	// ports are the sidecars' listeners, by workload.
	ports map[string]*sidecarPorts
}

// sidecarPorts are the loopback ports of one workload's sidecar.
type sidecarPorts struct {
	admin, stats, httpProxy uint32
	inbound                 map[uint32]uint32 // program port → the sidecar's listener for it
	upstream                map[string]uint32 // upstreamKey → the sidecar's listener
}

// sidecarPortBase is where the sidecars' ports are sought, up to the
// kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 unless
// changed).
const sidecarPortBase = 20000

func sidecarPortRange() (from, to uint32) {
	to = 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if low, err := strconv.ParseUint(f[0], 10, 16); err == nil && low > sidecarPortBase+1000 {
				to = uint32(low)
			}
		}
	}
	return sidecarPortBase, to
}

func upstreamKey(s meshfile.Service, port uint32) string {
	return fmt.Sprintf("%s.%s:%d", s.Name, s.Namespace, port)
}

func (p *processPlacement) check() error { return nil }

func (p *processPlacement) lockFiles() []string { return []string{stateLock(p.stateDir)} }

// cleanup has nothing beyond the recorded processes, which are ended
// before it.
func (p *processPlacement) cleanup() error { return os.RemoveAll(p.runRoot()) }

func (p *processPlacement) runRoot() string { return filepath.Join(p.stateDir, "run") }

// setup picks every sidecar's ports: free loopback ports below the
// kernel's ephemeral range (so that no connection's source port takes one
// before its sidecar binds it), none of the programs', held open until
// all are chosen so that none is picked twice.
func (p *processPlacement) setup() (string, error) {
	m := p.mesh
	taken := map[uint32]bool{}
	for _, w := range m.Workloads {
		for _, port := range w.Ports {
			taken[port.Port] = true
		}
		if w.Gateway != nil {
			for _, l := range w.Gateway.Listeners {
				taken[l.Port] = true
			}
		}
	}
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	next, limit := sidecarPortRange()
	free := func() (uint32, error) {
		for ; next < limit; next++ {
			if taken[next] {
				continue
			}
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", next))
			if err != nil {
				continue // someone else's
			}
			held = append(held, l)
			taken[next] = true
			return next, nil
		}
		return 0, fmt.Errorf("no free loopback port from %d to %d for the sidecars", sidecarPortBase, limit)
	}
	p.ports = map[string]*sidecarPorts{}
	for _, w := range m.Workloads {
		if !w.Injected() {
			continue
		}
		sp := &sidecarPorts{inbound: map[uint32]uint32{}, upstream: map[string]uint32{}}
		var err error
		if sp.admin, err = free(); err != nil {
			return "", err
		}
		if sp.stats, err = free(); err != nil {
			return "", err
		}
		if sp.httpProxy, err = free(); err != nil {
			return "", err
		}
		for _, port := range w.Ports {
			if sp.inbound[port.Port], err = free(); err != nil {
				return "", err
			}
		}
		for _, s := range m.Services {
			for _, sport := range s.Ports {
				if sp.upstream[upstreamKey(s, sport.Port)], err = free(); err != nil {
					return "", err
				}
			}
		}
		p.ports[w.Ref()] = sp
	}
	return "127.0.0.1:0", os.MkdirAll(p.runRoot(), 0o700)
}

func (p *processPlacement) addReplica(w meshfile.Workload, _ int, name string) (*slot, error) {
	dir := filepath.Join(p.runRoot(), name)
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err
	}
	sl := &slot{
		command: func(name string, args ...string) *exec.Cmd { return exec.Command(name, args...) },
		address: "127.0.0.1",
		env:     []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LANG=C.UTF-8", "TRELLIS_RUN_DIR=" + dir},
	}
	sp := p.ports[w.Ref()]
	if sp != nil && w.Gateway != nil {
		sl.proxyConfig = gatewayProxyConfig(p.mesh, w, "127.0.0.1")
		sl.proxyArgs = []string{"--admin-addr", fmt.Sprintf("127.0.0.1:%d", sp.admin), "--stats-addr", fmt.Sprintf("127.0.0.1:%d", sp.stats)}
		for _, l := range w.Gateway.Listeners {
			sl.inbound = append(sl.inbound, fmt.Sprintf("%s 127.0.0.1:%d", l.Protocol, l.Port))
		}
		return sl, nil
	}
	if sp != nil {
		sl.proxyConfig = p.proxyConfig(w, sp)
		sl.proxyArgs = []string{"--admin-addr", fmt.Sprintf("127.0.0.1:%d", sp.admin), "--stats-addr", fmt.Sprintf("127.0.0.1:%d", sp.stats)}
		proxy := fmt.Sprintf("http://127.0.0.1:%d", sp.httpProxy)
		sl.meshEnv = []string{"HTTP_PROXY=" + proxy, "http_proxy=" + proxy, "NO_PROXY=localhost,127.0.0.1,::1", "no_proxy=localhost,127.0.0.1,::1",
			fmt.Sprintf("TRELLIS_SIDECAR_ADMIN=127.0.0.1:%d", sp.admin)}
		for _, in := range w.Ports {
			sl.inbound = append(sl.inbound, fmt.Sprintf("%d→127.0.0.1:%d", in.Port, sp.inbound[in.Port]))
		}
	}
	sl.meshEnv = append(sl.meshEnv, p.serviceEnv(w, sp)...)
	return sl, nil
}

// proxyConfig is a sidecar's configuration without interception: an
// inbound listener per program port, the HTTP proxy, and an upstream
// listener per service port, which follows the destination the control
// plane sends for it.
func (p *processPlacement) proxyConfig(w meshfile.Workload, sp *sidecarPorts) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {namespace: %s, name: %s}\n", w.Namespace, w.Name)
	fmt.Fprintf(&b, "httpProxy: \"127.0.0.1:%d\"\n", sp.httpProxy)
	if len(w.Ports) > 0 {
		b.WriteString("inbound:\n")
		for _, in := range w.Ports {
			fmt.Fprintf(&b, "  - {listen: \"127.0.0.1:%d\", appPort: %d, protocol: %q}\n", sp.inbound[in.Port], in.Port, in.Protocol)
		}
	}
	if len(sp.upstream) > 0 {
		b.WriteString("outbound:\n")
		for _, s := range p.mesh.Services {
			for _, port := range s.Ports {
				fmt.Fprintf(&b, "  - {listen: \"127.0.0.1:%d\", service: %s.%s, port: %d}\n", sp.upstream[upstreamKey(s, port.Port)], s.Name, s.Namespace, port.Port)
			}
		}
	}
	return b.String()
}

// serviceEnv names where the program reaches each service port, the way
// Kubernetes does in a pod's environment (NAME_SERVICE_HOST,
// NAME_SERVICE_PORT, NAME_SERVICE_PORT_PORTNAME; for services of its own
// namespace) and, for every service, with the namespace in the name
// (NAME_NAMESPACE_SERVICE_…). With a sidecar (sp) that is the sidecar's
// upstream listener; without, a plaintext connection to the sidecar
// inbound listener of a workload behind the service — what a caller
// outside the mesh reaches, and the service's mTLS mode decides on.
func (p *processPlacement) serviceEnv(w meshfile.Workload, sp *sidecarPorts) []string {
	var env []string
	for _, s := range p.mesh.Services {
		prefixes := []string{envName(s.Name) + "_" + envName(s.Namespace)}
		if s.Namespace == w.Namespace {
			prefixes = append(prefixes, envName(s.Name))
		}
		for j, port := range s.Ports {
			local := p.reach(s, port, sp)
			if local == 0 {
				continue
			}
			for _, pre := range prefixes {
				if j == 0 {
					env = append(env, pre+"_SERVICE_HOST=127.0.0.1", fmt.Sprintf("%s_SERVICE_PORT=%d", pre, local))
				}
				if port.Name != "" {
					env = append(env, fmt.Sprintf("%s_SERVICE_PORT_%s=%d", pre, envName(port.Name), local))
				}
			}
		}
	}
	return env
}

// reach returns the local port a program reaches service port port of s
// at; 0 if none.
func (p *processPlacement) reach(s meshfile.Service, port meshfile.ServicePort, sp *sidecarPorts) uint32 {
	if sp != nil {
		return sp.upstream[upstreamKey(s, port.Port)]
	}
	for _, w := range p.mesh.Workloads {
		if s.Selects(w) && p.ports[w.Ref()] != nil {
			if in := p.ports[w.Ref()].inbound[port.TargetPort]; in != 0 {
				return in
			}
		}
	}
	return 0
}

// envName turns a name into an environment variable's part, as
// Kubernetes does: upper case, '-' as '_'.
func envName(s string) string {
	return strings.ToUpper(strings.ReplaceAll(s, "-", "_"))
}

func (p *processPlacement) started() error { return nil }

// externalHosts has nothing to do: programs reach ServiceEntry hosts by
// name through their sidecar as HTTP proxy.
func (p *processPlacement) externalHosts(map[string]netip.Addr) {}

func (p *processPlacement) listening(_ Replica, port uint32) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))), 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (p *processPlacement) teardown() error { return os.RemoveAll(p.runRoot()) }

func (p *processPlacement) describe() string {
	return "plain processes on this host's loopback, sidecars on the ports shown (program port→sidecar)"
}
