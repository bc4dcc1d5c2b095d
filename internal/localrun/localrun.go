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
	"os/user"
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
	"github.com/trellis-mesh/trellis/internal/meshid"
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
	Mesh *meshfile.Mesh
	// MeshFile is the path the user gave, for the commands printed.
	MeshFile string
	StateDir string
	// ProxyBinary is the trellis-proxy executable.
	ProxyBinary string
	Log         *slog.Logger
	// Out receives the summary for the user.
	Out io.Writer
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
	if real, err := filepath.EvalSymlinks(meshDir); err == nil {
		meshDir = real
	}
	h := fnv.New32a()
	h.Write([]byte(meshDir))
	return fmt.Sprintf("trl%05x", h.Sum32()&0xfffff)
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
	users    map[string]*credential // workload → who its program runs as
	ports    map[string][]uint32    // workload → its declared ports
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
	r.users = map[string]*credential{}
	for i, w := range m.Workloads {
		if r.users[w.Ref()], err = appCredential(prefix, i); err != nil {
			return err
		}
	}
	if err := checkMeshDir(m, r.users[m.Workloads[0].Ref()]); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(opts.StateDir, "logs"), 0o700); err != nil {
		return err
	}
	// One up per mesh and per state directory, for as long as it runs:
	// a second one would take the first's network for leftovers.
	unlock, err := lockRun(prefix, opts.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	// Holding the locks, whatever is left of an earlier run is a leftover.
	if prev, err := ReadState(opts.StateDir); err == nil && prev.Prefix != prefix {
		cleanupLeftovers(prev.Prefix, log)
	}
	if err := cleanupLeftovers(prefix, log); err != nil {
		return fmt.Errorf("removing leftovers of a previous run: %w", err)
	}
	// The record is this run's from now on: 'trellis down' signals its pid.
	if err := r.writeState(prefix); err != nil {
		return err
	}
	r.net, err = createNetwork(prefix, log)
	if err != nil {
		return err
	}
	defer func() {
		// A program that escaped its process group (setsid) still holds
		// its namespace: nothing of the mesh may outlive it.
		killLeftovers(prefix, log)
		_ = os.RemoveAll(filepath.Join(runRoot, prefix))
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
	cpDone := make(chan struct{})
	var cpErr error
	go func() { cpErr = cp.Run(cpCtx); close(cpDone) }()
	defer func() {
		stopCP()
		<-cpDone
		if cpErr != nil {
			err = errors.Join(err, cpErr)
		}
	}()
	defer r.stopAll()

	err = r.startAll(prefix)
	r.exited = r.watchExits()
	if err != nil {
		return err
	}
	r.printSummary(cp)
	if err := r.waitConverged(ctx, cp, cpDone); err != nil {
		if ctx.Err() != nil {
			return nil // interrupted while starting: stop, no error
		}
		return err
	}
	if st := cp.Status(); len(st.Resources.Error) > 0 {
		fmt.Fprintf(opts.Out, "\nWARNING: the policies in %s are rejected (run 'trellis status'); the mesh runs the last valid ones.\n", st.Resources.Directory)
	}
	fmt.Fprintf(opts.Out, "\nThe mesh is up. Ctrl-C (or 'trellis down') stops it.\n")
	select {
	case <-ctx.Done():
		fmt.Fprintf(opts.Out, "\nStopping: programs, then sidecars (draining), then the control plane and the network.\n")
		return nil
	case <-cpDone:
		return fmt.Errorf("the control plane stopped: %v", cpErr)
	case p := <-r.exited:
		return p.exitError()
	}
}

// exitError describes a program or sidecar that exited on its own.
func (p *process) exitError() error {
	how := "with status 0"
	if p.err != nil {
		how = "(" + p.err.Error() + ")"
	}
	return fmt.Errorf("%s exited %s; see its log %s", p.what, how, p.log.Name())
}

// cleanupLeftovers kills the processes left in a previous run's namespaces
// and removes its network.
func cleanupLeftovers(prefix string, log *slog.Logger) error {
	killLeftovers(prefix, log)
	_ = os.RemoveAll(filepath.Join(runRoot, prefix))
	return localnet.Cleanup(prefix, log)
}

// lockRun takes two locks for the run: one per mesh on the machine (its
// prefix), one per state directory. Each is a flock on a file, released by
// the kernel if up dies, so its state tells a running mesh from leftovers.
func lockRun(prefix, stateDir string) (unlock func(), err error) {
	if err := os.MkdirAll(lockDir, 0o700); err != nil {
		return nil, err
	}
	var held []*os.File
	unlock = func() {
		for _, f := range held {
			// The machine-wide lock file goes (it would pile up, one per
			// mesh directory ever run); removed while still locked, so
			// whoever opens the name next gets a new file, not this
			// one after it is released. The state directory's stays, as
			// Running reads it.
			if filepath.Dir(f.Name()) == lockDir {
				_ = os.Remove(f.Name())
			}
			f.Close()
		}
	}
	for _, path := range []string{filepath.Join(lockDir, prefix+".lock"), filepath.Join(stateDir, "up.lock")} {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			unlock()
			return nil, err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			unlock()
			return nil, fmt.Errorf("this mesh is already running (%s is locked): stop it with 'trellis down' first", path)
		}
		held = append(held, f)
	}
	return unlock, nil
}

// lockDir holds the per-mesh locks.
const lockDir = "/run/trellis"

// Running reports whether the mesh recorded in stateDir is running: its
// up holds the state directory's lock.
func Running(stateDir string) bool {
	f, err := os.OpenFile(filepath.Join(stateDir, "up.lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// CleanupStopped removes what a mesh that is not running left behind.
func CleanupStopped(stateDir string, log *slog.Logger) error {
	st, err := ReadState(stateDir)
	if err != nil {
		return err
	}
	// Both locks, as up holds them: another up of the same mesh (another
	// state directory) may be running on these names.
	unlock, err := lockRun(st.Prefix, stateDir)
	if err != nil {
		return fmt.Errorf("the mesh is running: %w", err)
	}
	defer unlock()
	if err := cleanupLeftovers(st.Prefix, log); err != nil {
		return err
	}
	return os.Remove(filepath.Join(stateDir, RunFile))
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
		for _, n := range meshid.ServiceHostNames(s.Name + "." + s.Namespace) {
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
				p, err := r.start("sidecar of "+name, cmd, rep.ProxyLog, nil)
				if err != nil {
					return err
				}
				r.proxies = append(r.proxies, p)
			}
			u := r.users[w.Ref()]
			runDir, err := r.runDir(prefix, name, u)
			if err != nil {
				return err
			}
			// The program runs unprivileged: as root it could read the
			// CA's keys, undo its namespace's interception rules or forge
			// the sidecar's bypass mark. Its user is its workload's alone,
			// so at stop everything running as that user is ended, even
			// what left the namespace.
			args := append([]string{fmt.Sprintf("--reuid=%d", u.uid), fmt.Sprintf("--regid=%d", u.gid), "--clear-groups",
				"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", commandPath(m, w.Command[0])}, w.Command[1:]...)
			cmd := host.Command(context.Background(), "setpriv", args...)
			cmd.Dir = m.Dir
			// Only what a program needs from the environment: root's may
			// hold secrets.
			cmd.Env = []string{"PATH=" + systemPath, "HOME=" + runDir, "LANG=C.UTF-8",
				"TRELLIS_WORKLOAD=" + w.Ref(), "TRELLIS_REPLICA=" + strconv.Itoa(i), "TRELLIS_RUN_DIR=" + runDir}
			for k, v := range w.Env {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			p, err := r.start(name, cmd, rep.AppLog, u)
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
			if out, err := h.Command(context.Background(), "iptables", append([]string{"-w", "5"}, rule...)...).CombinedOutput(); err != nil {
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

// credential is a user programs run as.
type credential struct {
	uid, gid uint32
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
func (r *runner) runDir(prefix, name string, u *credential) (string, error) {
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
// A program's log belongs to the program's user (owner), so that it can
// reopen its own output (nginx's /dev/stdout); the directory stays root's.
func (r *runner) start(what string, cmd *exec.Cmd, logPath string, owner *credential) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if owner != nil {
		if err := f.Chown(int(owner.uid), int(owner.gid)); err != nil {
			f.Close()
			return nil, err
		}
	}
	cmd.Stdout, cmd.Stderr = f, f
	// A session of its own: without a controlling terminal, a program
	// cannot inject keystrokes into up's (TIOCSTI); the process group is
	// the session's, for signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
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
func (r *runner) waitConverged(ctx context.Context, cp *controlplane.ControlPlane, cpDone <-chan struct{}) error {
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
		for _, p := range st.Proxies {
			if p.Connected && p.Rejected != "" && p.RejectedVersion == p.CurrentVersion {
				return fmt.Errorf("the sidecar of %s rejected its configuration: %s", p.Instance, p.Rejected)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("within 60s, %d of %d sidecars registered and converged, and not every program listens on its ports; see the logs under %s", connected, len(r.proxies), filepath.Join(r.opts.StateDir, "logs"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case p := <-r.exited:
			return p.exitError()
		case <-cpDone:
			return errors.New("the control plane stopped while the mesh was starting")
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
	fmt.Fprintf(out, "\nWorkloads (each replica in its own network namespace, its program as a user of its workload's own; logs: trellis logs -f %s NAMESPACE/NAME):\n", r.opts.MeshFile)
	r.mu.Lock()
	for _, rep := range r.replicas {
		mode := "with sidecar"
		if !rep.Injected {
			mode = "no sidecar"
		}
		fmt.Fprintf(out, "  %-30s replica %d  %-15s  %s\n", rep.Workload, rep.Index, rep.Address, mode)
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
		f := r.opts.MeshFile
		// A caller: a workload with a sidecar that is not behind the service.
		caller := m.Workloads[0]
		for _, w := range m.Workloads {
			if w.Injected() && !s.Selects(w) {
				caller = w
				break
			}
		}
		fmt.Fprintf(out, "\nTry (as root): trellis exec -f %s %s -- curl -sS http://%s.%s:%d/\n", f, caller.Ref(), s.Name, s.Namespace, s.Ports[0].Port)
		fmt.Fprintf(out, "               (the policies decide: an answer, or 403 naming why)\n")
		fmt.Fprintf(out, "               trellis status -f %s\n", f)
	}
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
