package localrun

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/trellis-mesh/trellis/internal/localnet"
	"github.com/trellis-mesh/trellis/internal/meshfile"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// controlPlanePort is where proxies reach the control plane, on the
// bridge's address.
const controlPlanePort = 15012

// lockDir holds the per-mesh locks of netns isolation.
const lockDir = "/run/trellis"

// netnsPlacement runs each replica in a network namespace of its own on a
// bridge, its sidecar beside it with the interception rules of a
// Kubernetes init container, its program as a user of its workload's own.
// Needs Linux and root.
type netnsPlacement struct {
	prefix, stateDir string
	mesh             *meshfile.Mesh // nil when only cleaning up
	log              *slog.Logger
	net              *localnet.Network
	users            map[string]*credential // workload → who its program runs as
	// hostsMu guards hosts and placed: the control plane reports
	// ServiceEntry hosts from its own goroutine.
	hostsMu  sync.Mutex
	hosts    map[string]netip.Addr // service names (and ServiceEntry hosts) → virtual IPs
	services map[string]netip.Addr // the mesh file's services' names alone
	placed   []*localnet.Host
	plain    []*localnet.Host        // replicas without sidecar
	addrs    map[string][]netip.Addr // workload → its replicas' addresses
}

func (p *netnsPlacement) check() error {
	if err := localnet.Available(); err != nil {
		return err
	}
	m := p.mesh
	p.users = map[string]*credential{}
	for i, w := range m.Workloads {
		u, err := appCredential(p.prefix, i)
		if err != nil {
			return err
		}
		p.users[w.Ref()] = u
	}
	return checkMeshDir(m, p.users[m.Workloads[0].Ref()])
}

func (p *netnsPlacement) lockFiles() []string {
	return []string{filepath.Join(lockDir, p.prefix+".lock"), stateLock(p.stateDir)}
}

// cleanup kills the processes left in an earlier run's namespaces and
// removes its network.
func (p *netnsPlacement) cleanup() error {
	killLeftovers(p.prefix, p.log)
	_ = os.RemoveAll(filepath.Join(runRoot, p.prefix))
	return localnet.Cleanup(p.prefix, p.log)
}

func (p *netnsPlacement) setup() (string, error) {
	var err error
	if p.net, err = createNetwork(p.prefix, p.log); err != nil {
		return "", err
	}
	p.services = map[string]netip.Addr{}
	p.addrs = map[string][]netip.Addr{}
	vips := p.mesh.ServiceAddresses()
	for _, s := range p.mesh.Services {
		for _, n := range meshid.ServiceHostNames(s.Name + "." + s.Namespace) {
			p.services[n] = vips[s.Namespace+"/"+s.Name]
		}
	}
	p.hostsMu.Lock()
	p.hosts = maps.Clone(p.services)
	p.hostsMu.Unlock()
	return net.JoinHostPort(p.net.HostAddr().String(), strconv.Itoa(controlPlanePort)), nil
}

func (p *netnsPlacement) addReplica(w meshfile.Workload, i int, name string) (*slot, error) {
	p.hostsMu.Lock()
	defer p.hostsMu.Unlock()
	spec := localnet.HostSpec{Name: name, Hosts: maps.Clone(p.hosts)}
	if w.Injected() && w.Gateway == nil { // a gateway has no program to intercept
		spec.Intercept = &intercept.RuleConfig{InboundPort: meshfile.InboundPort, OutboundPort: meshfile.OutboundPort, ExcludeInboundPorts: []int{meshfile.AdminPort, meshfile.StatsPort}}
	}
	host, err := p.net.AddHost(spec)
	if err != nil {
		return nil, err
	}
	p.placed = append(p.placed, host)
	p.addrs[w.Ref()] = append(p.addrs[w.Ref()], host.Addr)
	if !w.Injected() {
		p.plain = append(p.plain, host)
	}
	u := p.users[w.Ref()]
	dir, err := runDir(p.prefix, name, u)
	if err != nil {
		return nil, err
	}
	return &slot{
		// Not up's context: stopping is stopAll's, in order.
		command:     func(name string, args ...string) *exec.Cmd { return host.Command(context.Background(), name, args...) },
		netns:       host.Netns,
		address:     host.Addr.String(),
		proxyConfig: p.proxyConfig(w),
		proxyArgs: []string{"--advertise-ip", host.Addr.String(), "--admin-addr", fmt.Sprintf("127.0.0.1:%d", meshfile.AdminPort),
			"--stats-addr", fmt.Sprintf("0.0.0.0:%d", meshfile.StatsPort)},
		user: u,
		// Only what a program needs from the environment: root's may
		// hold secrets.
		env: []string{"PATH=" + systemPath, "HOME=" + dir, "LANG=C.UTF-8", "TRELLIS_RUN_DIR=" + dir},
	}, nil
}

// externalHosts writes the ServiceEntry hosts' virtual IPs into every
// namespace's hosts file, beside the services' names: an application
// resolves the host to an address its sidecar intercepts and routes.
func (p *netnsPlacement) externalHosts(vips map[string]netip.Addr) {
	p.hostsMu.Lock()
	defer p.hostsMu.Unlock()
	if p.services == nil {
		return // not set up: nothing placed yet, and setup starts afresh
	}
	hosts := maps.Clone(p.services)
	for h, a := range vips {
		if _, taken := hosts[h]; !taken {
			hosts[h] = a
		}
	}
	p.hosts = hosts
	for _, h := range p.placed {
		if err := h.SetHosts(hosts); err != nil {
			p.log.Error("updating a namespace's hosts file with ServiceEntry hosts", "netns", h.Netns, "err", err)
		}
	}
}

// started installs, in the namespaces of replicas without a sidecar, what
// kube-proxy does for such pods: nothing else resolves a service's virtual
// IP there, and a plaintext client must reach the service (whose
// PeerAuthentication mode decides whether it may).
func (p *netnsPlacement) started() error {
	rules := serviceRules(p.mesh, p.addrs)
	for _, h := range p.plain {
		for _, rule := range rules {
			if out, err := h.Command(context.Background(), "iptables", append([]string{"-w", "5"}, rule...)...).CombinedOutput(); err != nil {
				return fmt.Errorf("service rules in %s: iptables %s: %v: %s", h.Netns, strings.Join(rule, " "), err, out)
			}
		}
	}
	return nil
}

// listening looks from inside the replica's namespace: from outside, the
// sidecar's interception answers for the program.
func (p *netnsPlacement) listening(rep Replica, port uint32) bool {
	out, err := exec.Command("ip", "netns", "exec", rep.Netns, "ss", "-Hltn", "sport", "=", ":"+strconv.Itoa(int(port))).Output()
	return err == nil && len(strings.TrimSpace(string(out))) > 0
}

func (p *netnsPlacement) teardown() error {
	// A program that escaped its process group (setsid) still holds its
	// namespace: nothing of the mesh may outlive it.
	killLeftovers(p.prefix, p.log)
	_ = os.RemoveAll(filepath.Join(runRoot, p.prefix))
	if p.net == nil {
		return nil
	}
	return p.net.Close()
}

func (p *netnsPlacement) describe() string {
	return "each replica in its own network namespace, its program as a user of its workload's own"
}

func (p *netnsPlacement) proxyConfig(w meshfile.Workload) string {
	if w.Gateway != nil {
		return gatewayProxyConfig(p.mesh, w, "0.0.0.0")
	}
	return transparentProxyConfig(w)
}

// transparentProxyConfig is a replica sidecar's configuration under
// interception: transparent listeners and the workload's ports;
// destinations and policies come from the control plane.
func transparentProxyConfig(w meshfile.Workload) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {namespace: %s, name: %s}\n", w.Namespace, w.Name)
	fmt.Fprintf(&b, "transparent: {inbound: \"0.0.0.0:%d\", outbound: \"0.0.0.0:%d\"}\n", meshfile.InboundPort, meshfile.OutboundPort)
	if len(w.Ports) > 0 {
		b.WriteString("inbound:\n")
		for _, p := range w.Ports {
			fmt.Fprintf(&b, "  - {appPort: %d, protocol: %q}\n", p.Port, p.Protocol)
		}
	}
	return b.String()
}

// createNetwork makes the mesh's bridge on a /24 of 198.18.0.0/16 of its
// own — the one its prefix hashes to, or the next free one — so that
// several meshes can run side by side. (198.19.0.0/16, the other half of
// the benchmark range, holds the services' virtual IPs.)
func createNetwork(prefix string, log *slog.Logger) (*localnet.Network, error) {
	h := fnv.New32a()
	h.Write([]byte(prefix))
	start := int(h.Sum32() % 256)
	var lastErr error
	for i := range 256 {
		n := (start + i) % 256
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(n), 0}), 24)
		nw, err := localnet.Create(localnet.Config{Prefix: prefix, Subnet: subnet, ServiceRange: meshfile.ServiceRange, Log: log})
		if err == nil {
			return nw, nil
		}
		if !errors.Is(err, localnet.ErrSubnetInUse) {
			return nil, err
		}
		lastErr = err
	}
	return nil, lastErr
}

// serviceRules returns the iptables rules that send connections to a
// service's virtual IP and port to one of its replicas' target port,
// spread at random as kube-proxy does.
func serviceRules(m *meshfile.Mesh, addrs map[string][]netip.Addr) [][]string {
	vips := m.ServiceAddresses()
	var rules [][]string
	for _, s := range m.Services {
		var backends []netip.Addr
		for _, w := range m.Workloads {
			if s.Selects(w) {
				backends = append(backends, addrs[w.Ref()]...)
			}
		}
		vip := vips[s.Namespace+"/"+s.Name].String()
		for _, p := range s.Ports {
			for i, b := range backends {
				rule := []string{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", vip, "--dport", strconv.Itoa(int(p.Port))}
				if left := len(backends) - i; left > 1 {
					rule = append(rule, "-m", "statistic", "--mode", "random", "--probability", strconv.FormatFloat(1/float64(left), 'f', 5, 64))
				}
				rules = append(rules, append(rule, "-j", "DNAT", "--to-destination", net.JoinHostPort(b.String(), strconv.Itoa(int(p.TargetPort)))))
			}
		}
	}
	return rules
}

// Programs run as a user of their own per workload, which owns nothing of
// the mesh: not the mesh file, not the policies, not another workload's
// processes or files. (The user who ran sudo would own the checkout and
// could rewrite the policies; one shared user could ptrace its
// neighbours.) Each mesh has a block of maxWorkloads uids above
// firstAppUID, chosen by its prefix, so that ending a mesh's users ends no
// other mesh's programs.
const (
	firstAppUID  = 200000
	maxWorkloads = meshfile.MaxWorkloads
	uidBlocks    = 16384
)

// uidBase returns the first uid of a mesh's block.
func uidBase(prefix string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(prefix))
	return firstAppUID + (h.Sum32()%uidBlocks)*maxWorkloads
}

// appCredential returns the user of the workload with index i.
func appCredential(prefix string, i int) (*credential, error) {
	g, err := user.LookupGroup("nogroup")
	if err != nil {
		return nil, fmt.Errorf("no group nogroup to run the programs with: %w", err)
	}
	gid, _ := strconv.ParseUint(g.Gid, 10, 32)
	return &credential{uid: uidBase(prefix) + uint32(i), gid: uint32(gid)}, nil
}

// killUsers ends every process running as one of a mesh's users.
func killUsers(prefix string, log *slog.Logger) {
	base := uidBase(prefix)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		status, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(status)) {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "Uid:" {
				continue
			}
			if uid, err := strconv.ParseUint(f[1], 10, 32); err == nil && uint32(uid) >= base && uint32(uid) < base+maxWorkloads {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				log.Info("killed a process of the mesh's programs that was still running", "pid", pid, "uid", uid)
			}
			break
		}
	}
}

// checkMeshDir verifies that a workload's user can read the mesh
// directory (its working directory) but not change the policies or the
// mesh file.
func checkMeshDir(m *meshfile.Mesh, u *credential) error {
	probe := func(args ...string) bool {
		return exec.Command("setpriv", append([]string{fmt.Sprintf("--reuid=%d", u.uid), fmt.Sprintf("--regid=%d", u.gid), "--clear-groups", "--"}, args...)...).Run() == nil
	}
	if !probe("test", "-x", m.Dir) {
		return fmt.Errorf("the programs run as uid %d and cannot enter %s: make it and the directories above it readable by others (chmod o+rx)", u.uid, m.Dir)
	}
	for _, p := range []string{m.Path(m.Policies), m.Dir} {
		if p != "" && probe("test", "-w", p) {
			return fmt.Errorf("%s is writable by everyone, so a workload could change the mesh: chmod o-w %s", p, p)
		}
	}
	return nil
}

// systemPath is the programs' PATH: the system's directories, not root's
// own (which may point into /root, where the programs' user cannot go).
const systemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// runRoot holds each replica's scratch directory (TRELLIS_RUN_DIR: pid
// files, temporary files), outside the state directory, which programs
// must not read.
const runRoot = "/run/trellis-run"

// runDir makes a replica's scratch directory, owned by the program's user.
func runDir(prefix, name string, u *credential) (string, error) {
	base := filepath.Join(runRoot, prefix)
	if err := os.MkdirAll(base, 0o755); err != nil {
		return "", err
	}
	dir := filepath.Join(base, name)
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	return dir, os.Chown(dir, int(u.uid), int(u.gid))
}

// killLeftovers kills the processes still running in the network
// namespaces of a previous run (a crashed up leaves its programs and
// sidecars behind): sidecars of a dead mesh would otherwise register with
// the new control plane, and programs hold their namespaces.
func killLeftovers(prefix string, log *slog.Logger) {
	killUsers(prefix, log)
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		ns, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if !strings.HasPrefix(ns, prefix+"-") {
			continue
		}
		pids, err := exec.Command("ip", "netns", "pids", ns).Output()
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(pids)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				log.Info("killed a process left in a namespace of a previous run", "netns", ns, "pid", pid)
			}
		}
	}
}
