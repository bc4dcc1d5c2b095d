// Package localrun is `trellis up`: it runs a whole mesh on one machine.
// The control plane runs in-process; every replica of every workload gets
// a network namespace of its own on a bridge (package localnet), with its
// program and, unless it is not injected, its sidecar beside it and the
// interception rules a Kubernetes init container would install. Service
// names resolve inside every namespace to the services' virtual IPs.
//
// Stopping (context cancelled) goes in order: the programs, then the
// sidecars (which drain and say goodbye), then the control plane, then the
// network. What is running is recorded in the state directory so that
// `trellis exec`, `trellis logs` and `trellis down` can find it, and so
// that the next `up` after a crash removes the leftovers first.
package localrun

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/jointoken"
	"github.com/trellis-mesh/trellis/internal/localnet"
	"github.com/trellis-mesh/trellis/internal/meshfile"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
	"github.com/trellis-mesh/trellis/internal/statefile"
)

// RunFile records a running mesh in the state directory.
const RunFile = "up.json"

// Control plane ports: proxies reach it on the bridge address, the CLI on
// loopback.
const (
	controlPlanePort = 15012
	// adminAddr: any free loopback port; the CLI finds it in the state
	// directory, and several meshes can run at once.
	adminAddr      = "127.0.0.1:0"
	stopWait       = 5 * time.Second
	proxyDrainWait = 15 * time.Second
)

// Options configure Run.
type Options struct {
	Mesh     *meshfile.Mesh
	StateDir string
	// ProxyBinary is the trellis-proxy executable.
	ProxyBinary string
	Log         *slog.Logger
	// Out receives the summary for the user.
	Out io.Writer
	// Ready, when set, is called once every replica is running and every
	// sidecar has its configuration.
	Ready func()
}

// State is the content of RunFile.
type State struct {
	PID      int       `json:"pid"`
	Prefix   string    `json:"prefix"`
	MeshFile string    `json:"meshDir"`
	Replicas []Replica `json:"replicas"`
}

// Replica is one running replica of a workload.
type Replica struct {
	Workload string `json:"workload"` // namespace/name
	Index    int    `json:"index"`
	Netns    string `json:"netns"`
	Address  string `json:"address"`
	Injected bool   `json:"injected"`
	AppLog   string `json:"appLog"`
	ProxyLog string `json:"proxyLog,omitempty"`
}

// Prefix names what a mesh creates on the machine: stable for a mesh
// directory, so leftovers of a crashed run are found by the next.
func Prefix(meshDir string) string {
	h := fnv.New32a()
	h.Write([]byte(meshDir))
	return fmt.Sprintf("trl%04x", h.Sum32()&0xffff)
}

// ReadState returns the record of the mesh running with stateDir.
func ReadState(stateDir string) (*State, error) {
	data, err := os.ReadFile(filepath.Join(stateDir, RunFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no mesh is running with state directory %s (start one with 'trellis up')", stateDir)
	}
	if err != nil {
		return nil, err
	}
	var st State
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(stateDir, RunFile), err)
	}
	return &st, nil
}

// process is one started program.
type process struct {
	what string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	log  *os.File
}

// runner holds what Run started, to stop it in order.
type runner struct {
	opts     Options
	log      *slog.Logger
	net      *localnet.Network
	apps     []*process
	proxies  []*process
	exited   <-chan *process
	ports    map[string][]uint32 // workload → its declared ports
	mu       sync.Mutex
	replicas []Replica
}

// Run starts the mesh and serves until ctx ends, then stops everything.
func Run(ctx context.Context, opts Options) (err error) {
	if err := localnet.Available(); err != nil {
		return err
	}
	m := opts.Mesh
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &runner{opts: opts, log: log, ports: map[string][]uint32{}}
	for _, w := range m.Workloads {
		for _, p := range w.Ports {
			r.ports[w.Ref()] = append(r.ports[w.Ref()], p.Port)
		}
	}
	prefix := Prefix(m.Dir)
	if err := os.MkdirAll(filepath.Join(opts.StateDir, "logs"), 0o700); err != nil {
		return err
	}
	if prev, err := ReadState(opts.StateDir); err == nil {
		if alive(prev.PID) {
			return fmt.Errorf("a mesh is already running from %s (pid %d): stop it with 'trellis down' first", opts.StateDir, prev.PID)
		}
		log.Info("removing the leftovers of a mesh that did not stop cleanly", "pid", prev.PID)
	}
	killLeftovers(prefix, log)
	if err := localnet.Cleanup(prefix, log); err != nil {
		return fmt.Errorf("removing leftovers of a previous run: %w", err)
	}
	r.net, err = createNetwork(prefix, log)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := r.net.Close(); cerr != nil {
			log.Error("removing the mesh's network", "err", cerr)
			err = errors.Join(err, cerr)
		}
		_ = os.Remove(filepath.Join(opts.StateDir, RunFile))
	}()

	listen := net.JoinHostPort(r.net.HostAddr().String(), strconv.Itoa(controlPlanePort))
	cpCfg := m.ControlPlane(opts.StateDir, listen, adminAddr)
	if err := cpCfg.Validate(); err != nil {
		return fmt.Errorf("control plane configuration: %w", err)
	}
	cp, err := controlplane.New(controlplane.Options{Config: cpCfg, Log: log.With("component", "control-plane"), Init: true})
	if err != nil {
		return err
	}
	cpCtx, stopCP := context.WithCancel(context.Background())
	cpDone := make(chan error, 1)
	go func() { cpDone <- cp.Run(cpCtx) }()
	defer func() {
		stopCP()
		if cerr := <-cpDone; cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	defer r.stopAll()

	err = r.startAll(prefix)
	r.exited = r.watchExits()
	if err != nil {
		return err
	}
	r.printSummary(cp)
	if err := r.waitConverged(ctx, cp); err != nil {
		return err
	}
	fmt.Fprintf(opts.Out, "\nThe mesh is up. Ctrl-C (or 'trellis down') stops it.\n")
	if opts.Ready != nil {
		opts.Ready()
	}
	select {
	case <-ctx.Done():
		fmt.Fprintf(opts.Out, "\nStopping: programs, then sidecars (draining), then the control plane and the network.\n")
		return nil
	case <-cpDone:
		return errors.New("the control plane stopped")
	case p := <-r.exited:
		return fmt.Errorf("%s exited (%v); see its log %s", p.what, p.err, p.log.Name())
	}
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

// startAll creates every replica's namespace and starts its sidecar and
// program.
func (r *runner) startAll(prefix string) error {
	m := r.opts.Mesh
	hosts := map[string]netip.Addr{}
	vips := m.ServiceAddresses()
	for _, s := range m.Services {
		for _, n := range meshfile.HostNames(s.Namespace, s.Name) {
			hosts[n] = vips[s.Namespace+"/"+s.Name]
		}
	}
	tokens := jointoken.NewStore(r.opts.StateDir, nil)
	var plain []*localnet.Host         // replicas without sidecar
	addrs := map[string][]netip.Addr{} // workload → its replicas' addresses
	bundle := filepath.Join(r.opts.StateDir, "bundle.pem")
	for _, w := range m.Workloads {
		for i := range w.ReplicaCount() {
			name := fmt.Sprintf("%s-%s-%d", w.Namespace, w.Name, i)
			spec := localnet.HostSpec{Name: name, Hosts: hosts}
			if w.Injected() {
				spec.Intercept = &intercept.RuleConfig{InboundPort: meshfile.InboundPort, OutboundPort: meshfile.OutboundPort, ExcludeInboundPorts: []int{meshfile.AdminPort}}
			}
			host, err := r.net.AddHost(spec)
			if err != nil {
				return fmt.Errorf("workload %s replica %d: %w", w.Ref(), i, err)
			}
			addrs[w.Ref()] = append(addrs[w.Ref()], host.Addr)
			if !w.Injected() {
				plain = append(plain, host)
			}
			rep := Replica{Workload: w.Ref(), Index: i, Netns: host.Netns, Address: host.Addr.String(), Injected: w.Injected(),
				AppLog: filepath.Join(r.opts.StateDir, "logs", name+".log")}
			if w.Injected() {
				rep.ProxyLog = filepath.Join(r.opts.StateDir, "logs", name+".proxy.log")
				secret, _, err := tokens.Create(w.Namespace, w.ServiceAccount, 10*time.Minute, 1)
				if err != nil {
					return err
				}
				dir := filepath.Join(r.opts.StateDir, "replicas", name)
				if err := os.MkdirAll(dir, 0o700); err != nil {
					return err
				}
				tokenFile := filepath.Join(dir, "join-token")
				if err := statefile.WriteAtomic(tokenFile, []byte(secret+"\n"), 0o600); err != nil {
					return err
				}
				cfgFile := filepath.Join(dir, "proxy.yaml")
				if err := statefile.WriteAtomic(cfgFile, []byte(proxyConfig(w)), 0o600); err != nil {
					return err
				}
				// Not ctx: stopping is stopAll's, in order.
				cmd := host.Command(context.Background(), r.opts.ProxyBinary,
					"--identity-addr", net.JoinHostPort(r.net.HostAddr().String(), strconv.Itoa(controlPlanePort)),
					"--trust-domain", m.TrustDomain, "--ca-bundle", bundle,
					"--namespace", w.Namespace, "--service-account", w.ServiceAccount, "--join-token-file", tokenFile,
					"--config", cfgFile, "--control-plane", "--instance", fmt.Sprintf("%s-%d", w.Name, i),
					"--advertise-ip", host.Addr.String(), "--admin-addr", fmt.Sprintf("127.0.0.1:%d", meshfile.AdminPort))
				p, err := r.start("sidecar of "+name, cmd, rep.ProxyLog)
				if err != nil {
					return err
				}
				r.proxies = append(r.proxies, p)
			}
			cmd := host.Command(context.Background(), commandPath(m, w.Command[0]), w.Command[1:]...)
			cmd.Dir = m.Dir
			cmd.Env = append(os.Environ(), "TRELLIS_WORKLOAD="+w.Ref(), "TRELLIS_REPLICA="+strconv.Itoa(i))
			for k, v := range w.Env {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			p, err := r.start(name, cmd, rep.AppLog)
			if err != nil {
				return err
			}
			r.apps = append(r.apps, p)
			r.mu.Lock()
			r.replicas = append(r.replicas, rep)
			r.mu.Unlock()
			if err := r.writeState(prefix); err != nil {
				return err
			}
		}
	}
	// Without a sidecar nothing resolves a service's virtual IP; do what
	// kube-proxy does for such pods, so a plaintext client reaches the
	// service (and the PeerAuthentication mode decides whether it may).
	rules := serviceRules(m, addrs)
	for _, h := range plain {
		for _, rule := range rules {
			if out, err := h.Command(context.Background(), "iptables", rule...).CombinedOutput(); err != nil {
				return fmt.Errorf("service rules in %s: iptables %s: %v: %s", h.Netns, strings.Join(rule, " "), err, out)
			}
		}
	}
	return nil
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

// commandPath keeps a bare program name (found on PATH) as it is and makes
// a path relative to the mesh file.
func commandPath(m *meshfile.Mesh, prog string) string {
	if strings.ContainsRune(prog, '/') {
		return m.Path(prog)
	}
	return prog
}

// proxyConfig is a replica sidecar's configuration: transparent listeners,
// the workload's ports; destinations and policies come from the control
// plane.
func proxyConfig(w meshfile.Workload) string {
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

// start runs cmd in its own process group with its output in logPath.
func (r *runner) start(what string, cmd *exec.Cmd, logPath string) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// The context kills; stopAll sends SIGTERM first.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	p := &process{what: what, cmd: cmd, done: make(chan struct{}), log: f}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	r.log.Info("started", "what", what, "pid", cmd.Process.Pid, "log", logPath)
	return p, nil
}

// watchExits reports the first program or sidecar that exits on its own.
func (r *runner) watchExits() <-chan *process {
	ch := make(chan *process, 1)
	for _, p := range slices.Concat(r.apps, r.proxies) {
		go func() {
			<-p.done
			select {
			case ch <- p:
			default:
			}
		}()
	}
	return ch
}

// stopAll stops the programs, then the sidecars, each with SIGTERM and,
// after a grace time, SIGKILL.
func (r *runner) stopAll() {
	stop := func(ps []*process, wait time.Duration) {
		for _, p := range ps {
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		}
		deadline := time.After(wait)
		for _, p := range ps {
			select {
			case <-p.done:
			case <-deadline:
				_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
				<-p.done
			}
		}
	}
	stop(r.apps, stopWait)
	stop(r.proxies, proxyDrainWait)
}

func (r *runner) writeState(prefix string) error {
	r.mu.Lock()
	st := State{PID: os.Getpid(), Prefix: prefix, MeshFile: r.opts.Mesh.Dir, Replicas: slices.Clone(r.replicas)}
	r.mu.Unlock()
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return statefile.WriteAtomic(filepath.Join(r.opts.StateDir, RunFile), data, 0o600)
}

// waitConverged waits until every sidecar has registered and runs its
// current configuration.
func (r *runner) waitConverged(ctx context.Context, cp *controlplane.ControlPlane) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := cp.Status()
		connected := 0
		for _, p := range st.Proxies {
			if p.Connected {
				connected++
			}
		}
		if connected == len(r.proxies) && st.Converged && r.listening() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("within 60s, %d of %d sidecars registered and converged, and not every program listens on its ports; see the logs under %s", connected, len(r.proxies), filepath.Join(r.opts.StateDir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case p := <-r.exited:
			return fmt.Errorf("%s exited (%v); see its log %s", p.what, p.err, p.log.Name())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// listening reports whether every replica's program listens on each of
// its declared ports (seen from inside its namespace: from outside, the
// sidecar's interception answers for it).
func (r *runner) listening() bool {
	r.mu.Lock()
	reps := slices.Clone(r.replicas)
	r.mu.Unlock()
	for _, rep := range reps {
		for _, p := range r.ports[rep.Workload] {
			out, err := exec.Command("ip", "netns", "exec", rep.Netns, "ss", "-Hltn", "sport", "=", ":"+strconv.Itoa(int(p))).Output()
			if err != nil || len(strings.TrimSpace(string(out))) == 0 {
				return false
			}
		}
	}
	return true
}

func (r *runner) printSummary(cp *controlplane.ControlPlane) {
	m := r.opts.Mesh
	out := r.opts.Out
	fmt.Fprintf(out, "Control plane: proxies at %s, admin API at https://%s (trellis status --state-dir %s)\n", cp.Addr(), cp.AdminAddr(), r.opts.StateDir)
	fmt.Fprintf(out, "\nWorkloads (each replica in its own network namespace):\n")
	r.mu.Lock()
	for _, rep := range r.replicas {
		mode := "with sidecar"
		if !rep.Injected {
			mode = "no sidecar"
		}
		fmt.Fprintf(out, "  %-30s replica %d  %-15s  %s  (logs: trellis logs %s)\n", rep.Workload, rep.Index, rep.Address, mode, rep.Workload)
	}
	r.mu.Unlock()
	if len(m.Services) > 0 {
		fmt.Fprintf(out, "\nServices (resolvable inside every workload):\n")
		vips := m.ServiceAddresses()
		for _, s := range m.Services {
			var ports []string
			for _, p := range s.Ports {
				ports = append(ports, strconv.Itoa(int(p.Port)))
			}
			fmt.Fprintf(out, "  %-40s %s  ports %s\n", s.Name+"."+s.Namespace, vips[s.Namespace+"/"+s.Name], strings.Join(ports, ","))
		}
		s := m.Services[0]
		fmt.Fprintf(out, "\nTry: trellis exec %s -- curl -sS http://%s.%s:%d/\n", m.Workloads[0].Ref(), s.Name, s.Namespace, s.Ports[0].Port)
	}
}

// killLeftovers kills the processes still running in the network
// namespaces of a previous run (a crashed up leaves its programs and
// sidecars behind): sidecars of a dead mesh would otherwise register with
// the new control plane, and programs hold their namespaces.
func killLeftovers(prefix string, log *slog.Logger) {
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

// alive reports whether a process with pid exists.
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	return syscall.Kill(pid, 0) == nil
}
