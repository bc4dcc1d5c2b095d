// Package localrun is `trellis up`: it runs a whole mesh on one machine.
// The control plane runs in-process; every replica of every workload runs
// with its program and, unless it is not injected, its sidecar. Where they
// run is the mesh's isolation (a placement): under netns, each replica has
// a network namespace of its own on a bridge (package localnet), with the
// interception rules a Kubernetes init container would install and service
// names resolving to the services' virtual IPs; under process, programs
// are plain processes of the user running up, which reach services through
// their sidecar as HTTP proxy or on explicit upstream ports.
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
	"github.com/trellis-mesh/trellis/internal/meshfile"
	"github.com/trellis-mesh/trellis/internal/statefile"
)

// RunFile records a running mesh in the state directory.
const RunFile = "up.json"

const (
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
	PID       int       `json:"pid"`
	Prefix    string    `json:"prefix"`
	Isolation string    `json:"isolation"`
	MeshFile  string    `json:"meshDir"`
	Replicas  []Replica `json:"replicas"`
	// Processes are the programs and sidecars started, so that those of a
	// run that crashed are ended by the next; BootID tells whether they
	// could still run (pids and start times repeat across boots).
	Processes []Started `json:"processes,omitempty"`
	BootID    string    `json:"bootId,omitempty"`
}

// Replica is one running replica of a workload.
type Replica struct {
	Workload string `json:"workload"` // namespace/name
	Index    int    `json:"index"`
	// Netns is the replica's network namespace (netns isolation).
	Netns    string `json:"netns,omitempty"`
	Address  string `json:"address"`
	Injected bool   `json:"injected"`
	AppLog   string `json:"appLog"`
	ProxyLog string `json:"proxyLog,omitempty"`
	// Env is what the program's environment has of the mesh (process
	// isolation: its HTTP proxy and upstream ports), for trellis exec.
	Env []string `json:"env,omitempty"`
	// Inbound says where the sidecar takes each program port's traffic
	// when nothing intercepts it ("8080→127.0.0.1:41234").
	Inbound []string `json:"inbound,omitempty"`
}

// Started identifies a started process across pid reuse: its pid (also its
// process group) and its start time in clock ticks since boot.
type Started struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
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
	if st.Isolation == "" {
		st.Isolation = meshfile.IsolationNetns // recorded before process isolation
	}
	return &st, nil
}

// placement is what an isolation mode decides: what makes a run exclusive,
// what an earlier run may have left, where the control plane listens,
// where each replica runs and how its sidecar gets the program's traffic.
type placement interface {
	// check verifies, before anything changes, that the mesh can run.
	check() error
	// lockFiles are locked for as long as the mesh runs.
	lockFiles() []string
	// cleanup removes what an earlier run of the mesh left behind (its
	// recorded processes are already ended).
	cleanup() error
	// setup readies the machine and returns where the control plane
	// listens for proxies.
	setup() (listen string, err error)
	// addReplica places replica i of w, whose name is name.
	addReplica(w meshfile.Workload, i int, name string) (*slot, error)
	// started runs once every replica runs.
	started() error
	// listening reports whether rep's program listens on port.
	listening(rep Replica, port uint32) bool
	// teardown removes what setup and addReplica made.
	teardown() error
	// describe says how replicas are isolated, for the summary.
	describe() string
	// externalHosts is told the virtual IPs of the ServiceEntry hosts
	// whenever the control plane puts resources in force.
	externalHosts(map[string]netip.Addr)
}

// slot is where and how one replica runs.
type slot struct {
	// command runs a program of the replica.
	command func(name string, args ...string) *exec.Cmd
	netns   string
	address string
	inbound []string // Replica.Inbound
	// proxyConfig is the sidecar's configuration file; proxyArgs the
	// flags of its own the placement adds.
	proxyConfig string
	proxyArgs   []string
	// user runs the program (nil: up's own user); env is its environment,
	// meshEnv the part of it that comes from the mesh.
	user    *credential
	env     []string
	meshEnv []string
}

func newPlacement(isolation, prefix, stateDir string, m *meshfile.Mesh, log *slog.Logger) placement {
	if isolation == meshfile.IsolationProcess {
		return &processPlacement{stateDir: stateDir, mesh: m}
	}
	return &netnsPlacement{prefix: prefix, stateDir: stateDir, mesh: m, log: log}
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
	opts      Options
	log       *slog.Logger
	place     placement
	prefix    string
	apps      []*process
	proxies   []*process
	exited    <-chan *process
	ports     map[string][]uint32 // workload → its declared ports
	mu        sync.Mutex
	replicas  []Replica
	processes []Started
}

// Run starts the mesh and serves until ctx ends, then stops everything.
func Run(ctx context.Context, opts Options) (err error) {
	m := opts.Mesh
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &runner{opts: opts, log: log, ports: map[string][]uint32{}, prefix: Prefix(m.Dir)}
	for _, w := range m.Workloads {
		for _, p := range w.Ports {
			r.ports[w.Ref()] = append(r.ports[w.Ref()], p.Port)
		}
	}
	r.place = newPlacement(m.Isolation, r.prefix, opts.StateDir, m, log)
	if err := r.place.check(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(opts.StateDir, "logs"), 0o700); err != nil {
		return err
	}
	// One up per mesh and per state directory, for as long as it runs:
	// a second one would take the first's processes for leftovers.
	unlock, err := lockRun(r.place.lockFiles())
	if err != nil {
		return err
	}
	defer unlock()
	// Holding the locks, whatever is left of an earlier run is a leftover.
	if prev, err := ReadState(opts.StateDir); err == nil {
		killStarted(prev, log)
		if prev.Prefix != r.prefix || prev.Isolation != m.Isolation {
			// Another placement's leftovers, under its own locks (another
			// up of it may run from another state directory).
			old := newPlacement(prev.Isolation, prev.Prefix, opts.StateDir, nil, log)
			if unlockOld, err := lockRun(old.lockFiles()); err != nil {
				log.Warn("the previous run's leftovers stay: its locks cannot be taken", "isolation", prev.Isolation, "err", err)
			} else {
				err := old.cleanup()
				unlockOld()
				if err != nil {
					log.Warn("removing the previous run's leftovers failed", "isolation", prev.Isolation, "err", err)
				}
			}
		}
	}
	if err := r.place.cleanup(); err != nil {
		return fmt.Errorf("removing leftovers of a previous run: %w", err)
	}
	// The record is this run's from now on: 'trellis down' signals its pid.
	if err := r.writeState(); err != nil {
		return err
	}
	listen, err := r.place.setup()
	if err != nil {
		return err
	}
	defer func() {
		if terr := r.place.teardown(); terr != nil {
			log.Error("removing what the mesh made", "err", terr)
			err = errors.Join(err, terr)
		}
		_ = os.Remove(filepath.Join(opts.StateDir, RunFile))
	}()

	cpCfg := m.ControlPlane(opts.StateDir, listen, adminAddr)
	if err := cpCfg.Validate(); err != nil {
		return fmt.Errorf("control plane configuration: %w", err)
	}
	cp, err := controlplane.New(controlplane.Options{Config: cpCfg, Log: log.With("component", "control-plane"), Init: true,
		OnExternalAddresses: r.place.externalHosts})
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

	err = r.startAll(cp.Addr())
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

// lockRun locks paths for the run. Each is a flock on a file, released by
// the kernel if up dies, so its state tells a running mesh from
// leftovers.
func lockRun(paths []string) (unlock func(), err error) {
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
	for _, path := range paths {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			unlock()
			return nil, err
		}
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

// stateLock is the state directory's lock file.
func stateLock(stateDir string) string { return filepath.Join(stateDir, "up.lock") }

// Running reports whether the mesh recorded in stateDir is running: its
// up holds the state directory's lock.
func Running(stateDir string) bool {
	f, err := os.OpenFile(stateLock(stateDir), os.O_RDWR, 0)
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
	place := newPlacement(st.Isolation, st.Prefix, stateDir, nil, log)
	// The locks up holds: another up of the same mesh (another state
	// directory) may be running on these names.
	unlock, err := lockRun(place.lockFiles())
	if err != nil {
		return fmt.Errorf("the mesh is running: %w", err)
	}
	defer unlock()
	killStarted(st, log)
	if err := place.cleanup(); err != nil {
		return err
	}
	return os.Remove(filepath.Join(stateDir, RunFile))
}

// startAll places every replica and starts its sidecar and program;
// cpAddr is where sidecars reach the control plane.
func (r *runner) startAll(cpAddr string) error {
	m := r.opts.Mesh
	tokens := jointoken.NewStore(r.opts.StateDir, nil)
	bundle := filepath.Join(r.opts.StateDir, "bundle.pem")
	for _, w := range m.Workloads {
		for i := range w.ReplicaCount() {
			name := fmt.Sprintf("%s-%s-%d", w.Namespace, w.Name, i)
			sl, err := r.place.addReplica(w, i, name)
			if err != nil {
				return fmt.Errorf("workload %s replica %d: %w", w.Ref(), i, err)
			}
			rep := Replica{Workload: w.Ref(), Index: i, Netns: sl.netns, Address: sl.address, Injected: w.Injected(),
				AppLog: filepath.Join(r.opts.StateDir, "logs", name+".log"), Env: sl.meshEnv, Inbound: sl.inbound}
			if w.Gateway != nil {
				rep.AppLog = "" // a gateway is its proxy alone
			}
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
				if err := statefile.WriteAtomic(cfgFile, []byte(sl.proxyConfig), 0o600); err != nil {
					return err
				}
				args := append([]string{"--identity-addr", cpAddr, "--trust-domain", m.TrustDomain, "--ca-bundle", bundle,
					"--namespace", w.Namespace, "--service-account", w.ServiceAccount, "--join-token-file", tokenFile,
					"--config", cfgFile, "--control-plane", "--instance", fmt.Sprintf("%s-%d", w.Name, i)}, sl.proxyArgs...)
				p, err := r.start("sidecar of "+name, sl.command(r.opts.ProxyBinary, args...), rep.ProxyLog, nil)
				if err != nil {
					return err
				}
				r.proxies = append(r.proxies, p)
			}
			if w.Gateway != nil {
				r.mu.Lock()
				r.replicas = append(r.replicas, rep)
				r.mu.Unlock()
				if err := r.writeState(); err != nil {
					return err
				}
				continue
			}
			prog, args := commandPath(m, w.Command[0]), w.Command[1:]
			if u := sl.user; u != nil {
				// The program runs unprivileged: as root it could read the
				// CA's keys, undo its namespace's interception rules or
				// forge the sidecar's bypass mark. Its user is its
				// workload's alone, so at stop everything running as that
				// user is ended, even what left the namespace.
				args = append([]string{fmt.Sprintf("--reuid=%d", u.uid), fmt.Sprintf("--regid=%d", u.gid), "--clear-groups",
					"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", prog}, args...)
				prog = "setpriv"
			}
			cmd := sl.command(prog, args...)
			cmd.Dir = m.Dir
			cmd.Env = append(slices.Clone(sl.env), "TRELLIS_WORKLOAD="+w.Ref(), "TRELLIS_REPLICA="+strconv.Itoa(i))
			cmd.Env = append(cmd.Env, sl.meshEnv...)
			for k, v := range w.Env {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			p, err := r.start(name, cmd, rep.AppLog, sl.user)
			if err != nil {
				return err
			}
			r.apps = append(r.apps, p)
			r.mu.Lock()
			r.replicas = append(r.replicas, rep)
			r.mu.Unlock()
			if err := r.writeState(); err != nil {
				return err
			}
		}
	}
	return r.place.started()
}

// credential is a user programs run as.
type credential struct {
	uid, gid uint32
}

// commandPath keeps a bare program name (found on PATH) as it is and makes
// a path relative to the mesh file.
func commandPath(m *meshfile.Mesh, prog string) string {
	if strings.ContainsRune(prog, '/') {
		return m.Path(prog)
	}
	return prog
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
	if start, err := startTime(cmd.Process.Pid); err == nil {
		r.mu.Lock()
		r.processes = append(r.processes, Started{PID: cmd.Process.Pid, Start: start})
		r.mu.Unlock()
		if err := r.writeState(); err != nil {
			r.log.Error("recording a started process", "err", err)
		}
	}
	r.log.Info("started", "what", what, "pid", cmd.Process.Pid, "log", logPath)
	return p, nil
}

// startTime returns when process pid started, in clock ticks since boot
// (field 22 of /proc/PID/stat, after the command name in parentheses).
func startTime(pid int) (uint64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// killStarted ends the process groups of a run that crashed, those whose
// leader is still the process that run started (not a later one given
// the same pid): same boot, same start time.
func killStarted(st *State, log *slog.Logger) {
	if st.BootID == "" || st.BootID != bootID() {
		return // a reboot ended them all
	}
	for _, p := range st.Processes {
		if start, err := startTime(p.PID); err == nil && start == p.Start {
			_ = syscall.Kill(-p.PID, syscall.SIGKILL)
			_ = syscall.Kill(p.PID, syscall.SIGKILL)
			log.Info("killed a process of a previous run", "pid", p.PID)
		}
	}
}

// bootID identifies this boot of the machine ("" if unknown).
func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
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

func (r *runner) writeState() error {
	r.mu.Lock()
	st := State{PID: os.Getpid(), Prefix: r.prefix, Isolation: r.opts.Mesh.Isolation, MeshFile: r.opts.Mesh.Dir,
		Replicas: slices.Clone(r.replicas), Processes: slices.Clone(r.processes), BootID: bootID()}
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
		// Registrations change views after a coalescing delay; without a
		// sync, proxies could all run versions that are about to change.
		cp.Sync()
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
// its declared ports.
func (r *runner) listening() bool {
	r.mu.Lock()
	reps := slices.Clone(r.replicas)
	r.mu.Unlock()
	for _, rep := range reps {
		for _, p := range r.ports[rep.Workload] {
			if !r.place.listening(rep, p) {
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
	fmt.Fprintf(out, "\nWorkloads (%s; logs: trellis logs -f %s NAMESPACE/NAME):\n", r.place.describe(), r.opts.MeshFile)
	r.mu.Lock()
	for _, rep := range r.replicas {
		mode := "with sidecar"
		if !rep.Injected {
			mode = "no sidecar"
		}
		if rep.AppLog == "" {
			mode = "gateway"
		}
		if len(rep.Inbound) > 0 {
			mode += ", ports " + strings.Join(rep.Inbound, ", ")
		}
		fmt.Fprintf(out, "  %-30s replica %d  %-15s  %s\n", rep.Workload, rep.Index, rep.Address, mode)
	}
	r.mu.Unlock()
	if len(m.Services) == 0 {
		return
	}
	s := m.Services[0]
	f := r.opts.MeshFile
	// A caller: a workload with a sidecar that is not behind the service.
	caller := m.Workloads[0]
	for _, w := range m.Workloads {
		if w.Injected() && w.Gateway == nil && !s.Selects(w) {
			caller = w
			break
		}
	}
	if m.Isolation == meshfile.IsolationProcess {
		fmt.Fprintf(out, "\nServices (through each sidecar: by name over its HTTP proxy, HTTP_PROXY; any protocol on the upstream ports in NAME_NAMESPACE_SERVICE_HOST/_PORT):\n")
		for _, s := range m.Services {
			fmt.Fprintf(out, "  %s.%s\n", s.Name, s.Namespace)
		}
		fmt.Fprintf(out, "\nTry: trellis exec -f %s %s -- curl -sS http://%s.%s:%d/\n", f, caller.Ref(), s.Name, s.Namespace, s.Ports[0].Port)
	} else {
		fmt.Fprintf(out, "\nServices (resolvable inside every workload):\n")
		vips := m.ServiceAddresses()
		for _, s := range m.Services {
			var ports []string
			for _, p := range s.Ports {
				ports = append(ports, strconv.Itoa(int(p.Port)))
			}
			fmt.Fprintf(out, "  %-40s %s  ports %s\n", s.Name+"."+s.Namespace, vips[s.Namespace+"/"+s.Name], strings.Join(ports, ","))
		}
		fmt.Fprintf(out, "\nTry (as root): trellis exec -f %s %s -- curl -sS http://%s.%s:%d/\n", f, caller.Ref(), s.Name, s.Namespace, s.Ports[0].Port)
	}
	fmt.Fprintf(out, "               (the policies decide: an answer, or 403 naming why)\n")
	fmt.Fprintf(out, "               trellis status -f %s\n", f)
	fmt.Fprintf(out, "Watch:         trellis stat|edges|check -f %s, trellis tap -f %s NAMESPACE/NAME, trellis dashboard -f %s\n", f, f, f)
}

// gatewayProxyConfig is a gateway's proxy configuration: its listeners on
// host, certificate files resolved against the mesh file; routes and
// destinations come from the control plane.
func gatewayProxyConfig(m *meshfile.Mesh, w meshfile.Workload, host string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {namespace: %s, name: %s}\ngateway:\n  listeners:\n", w.Namespace, w.Name)
	for _, l := range w.Gateway.Listeners {
		fmt.Fprintf(&b, "    - {listen: %q, protocol: %s", net.JoinHostPort(host, strconv.Itoa(int(l.Port))), l.Protocol)
		if l.Protocol == "HTTPS" {
			fmt.Fprintf(&b, ", certificate: %q, privateKey: %q", m.Path(l.Certificate), m.Path(l.PrivateKey))
		}
		b.WriteString("}\n")
	}
	return b.String()
}
