package k8snode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// container runs one container of a pod: its process, restarts and
// probes. Its state is guarded by the pod's lock.
type container struct {
	p       *pod
	spec    corev1.Container
	init    bool
	sidecar bool
	// startedOnce is closed when the container has started (its startup
	// probe passed) for the first time.
	startedOnce chan struct{}

	state, last corev1.ContainerState
	restarts    int32
	started     bool
	ready       bool
	id          string
	proc        *process
	// stopped: the node is stopping it; its exit is no crash.
	stopped bool
}

func newContainer(p *pod, spec corev1.Container, init, sidecar bool) *container {
	return &container{
		p: p, spec: spec, init: init, sidecar: sidecar, startedOnce: make(chan struct{}),
		state: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "PodInitializing"}},
	}
}

func (c *container) snapLocked() containerSnap {
	return containerSnap{
		Name: c.spec.Name, Image: c.spec.Image, Sidecar: c.sidecar,
		State: c.state, Last: c.last, Restarts: c.restarts,
		Started: c.started, Ready: c.ready, ID: c.id,
	}
}

// process is a running container process.
type process struct {
	container string
	cmd       *exec.Cmd
	pid       int
	user      user
	env       []string
	exited    chan struct{}
	code      int32
}

// signal signals the container's process group.
func (pr *process) signal(sig syscall.Signal) {
	_ = syscall.Kill(-pr.pid, sig)
}

// launchError is why a container could not be started.
type launchError struct {
	reason string
	// permanent: trying again cannot help (an unknown image).
	permanent bool
	err       error
}

func (e *launchError) Error() string { return e.reason + ": " + e.err.Error() }

// supervise runs a sidecar or an application container until the pod
// stops, restarting it after it exits as its restart policy says, with
// back-off.
func (c *container) supervise(ctx context.Context) {
	backoff := time.Second
	for {
		proc, err := c.launch()
		if err != nil && ctx.Err() != nil {
			return
		}
		if err != nil {
			c.waiting(err)
			var le *launchError
			if errors.As(err, &le) && le.permanent {
				<-ctx.Done()
				return
			}
		} else {
			pctx, stopProbes := context.WithCancel(ctx)
			c.p.wg.Add(1)
			go func() {
				defer c.p.wg.Done()
				c.probe(pctx, proc)
			}()
			began := time.Now()
			select {
			case <-proc.exited:
			case <-ctx.Done():
			}
			stopProbes()
			if ctx.Err() != nil || !c.restartAfter(proc.code) {
				return
			}
			if time.Since(began) > time.Minute {
				backoff = time.Second
			}
			c.p.log.Warn("container exited: restarting it", "container", c.spec.Name, "exit_code", proc.code, "backoff", backoff)
		}
		c.backOff()
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// runToCompletion runs a plain init container until it succeeds, trying
// again after a failure unless the pod's restart policy is Never.
func (c *container) runToCompletion(ctx context.Context) bool {
	backoff := time.Second
	for {
		proc, err := c.launch()
		if err != nil && ctx.Err() != nil {
			return false
		}
		if err != nil {
			c.waiting(err)
			var le *launchError
			if errors.As(err, &le) && le.permanent {
				return false
			}
		} else {
			select {
			case <-proc.exited:
			case <-ctx.Done():
				return false
			}
			if proc.code == 0 {
				return true
			}
			c.p.mu.Lock()
			never := c.p.obj.Spec.RestartPolicy == corev1.RestartPolicyNever
			if never {
				c.p.failed = fmt.Sprintf("init container %s exited with code %d", c.spec.Name, proc.code)
			}
			c.p.mu.Unlock()
			if never {
				c.p.log.Error("init container failed: the pod fails", "container", c.spec.Name, "exit_code", proc.code)
				c.p.kickStatus()
				return false
			}
			c.p.log.Warn("init container failed: running it again", "container", c.spec.Name, "exit_code", proc.code, "backoff", backoff)
		}
		c.backOff()
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// restartAfter reports whether the container is started again after it
// exited with code.
func (c *container) restartAfter(code int32) bool {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	if c.stopped || c.p.stopping {
		return false
	}
	if c.sidecar {
		return !c.p.completed
	}
	switch c.p.obj.Spec.RestartPolicy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return code != 0
	}
	return true
}

// backOff records a terminated container as waiting to start again.
func (c *container) backOff() {
	c.p.mu.Lock()
	if c.state.Terminated != nil {
		c.last = c.state
		c.restarts++
		c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
			Reason: "CrashLoopBackOff", Message: fmt.Sprintf("back-off restarting failed container %s", c.spec.Name),
		}}
	}
	c.p.mu.Unlock()
	c.p.kickStatus()
}

// waiting records why the container could not start.
func (c *container) waiting(err error) {
	reason, permanent := "CreateContainerError", false
	var le *launchError
	if errors.As(err, &le) {
		reason, permanent = le.reason, le.permanent
		err = le.err
	}
	c.p.mu.Lock()
	c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: err.Error()}}
	obj := c.p.obj
	c.p.mu.Unlock()
	c.p.n.recorder.Eventf(obj, corev1.EventTypeWarning, "Failed", "Error: container %s: %s: %v", c.spec.Name, reason, err)
	if permanent {
		c.p.setProblem(reason, fmt.Errorf("container %s: %w", c.spec.Name, err))
	} else {
		c.p.log.Warn("container cannot start yet", "container", c.spec.Name, "reason", reason, "err", err)
		c.p.kickStatus()
	}
}

// user is who a container's process runs as.
type user struct {
	uid, gid  int64
	groups    []int64
	noNewPriv bool
	// caps: for a root process, its bounding set when the container
	// drops capabilities (nil: all of them).
	caps []string
}

// containerUser is who a container runs as: its security context's user
// and group, else the pod's, else root (the user of an image without one).
func containerUser(pod *corev1.Pod, c *corev1.Container) (user, error) {
	psc := pod.Spec.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	csc := c.SecurityContext
	if csc == nil {
		csc = &corev1.SecurityContext{}
	}
	first := func(a, b *int64) *int64 {
		if a != nil {
			return a
		}
		return b
	}
	var u user
	if p := first(csc.RunAsUser, psc.RunAsUser); p != nil {
		u.uid = *p
	}
	u.gid = u.uid // an image's user's own group
	if p := first(csc.RunAsGroup, psc.RunAsGroup); p != nil {
		u.gid = *p
	}
	nonRoot := csc.RunAsNonRoot
	if nonRoot == nil {
		nonRoot = psc.RunAsNonRoot
	}
	if nonRoot != nil && *nonRoot && u.uid == 0 {
		return u, errors.New("runAsNonRoot is set and the container would run as root (uid 0): give runAsUser")
	}
	u.groups = slices.Clone(psc.SupplementalGroups)
	if psc.FSGroup != nil {
		u.groups = append(u.groups, *psc.FSGroup)
	}
	u.noNewPriv = csc.AllowPrivilegeEscalation != nil && !*csc.AllowPrivilegeEscalation
	if caps := csc.Capabilities; u.uid == 0 && caps != nil && slices.Contains(caps.Drop, "ALL") {
		u.caps = []string{}
		for _, c := range caps.Add {
			u.caps = append(u.caps, strings.ToLower(strings.TrimPrefix(string(c), "CAP_")))
		}
	}
	return u, nil
}

// setprivArgs are setpriv's options that make a process this user.
func (u user) setprivArgs() []string {
	var args []string
	if u.uid != 0 || u.gid != 0 {
		args = append(args, "--reuid="+strconv.FormatInt(u.uid, 10), "--regid="+strconv.FormatInt(u.gid, 10))
		if len(u.groups) == 0 {
			args = append(args, "--clear-groups")
		} else {
			var gs []string
			for _, g := range u.groups {
				gs = append(gs, strconv.FormatInt(g, 10))
			}
			args = append(args, "--groups="+strings.Join(gs, ","))
		}
	}
	if u.caps != nil {
		set := "-all"
		for _, c := range u.caps {
			set += ",+" + c
		}
		args = append(args, "--bounding-set="+set)
	}
	if u.noNewPriv {
		args = append(args, "--no-new-privs")
	}
	return args
}

// launch starts the container's process: in the pod's network namespace,
// in a mount namespace of its own with the pod's volumes, as its user.
func (c *container) launch() (*process, error) {
	p := c.p
	image, ok := p.n.cfg.Images[c.spec.Image]
	if !ok {
		return nil, &launchError{"ErrImagePull", true, fmt.Errorf("image %q is not known to k8snode: map it to a program in Config.Images", c.spec.Image)}
	}
	obj := p.withStatus()
	h := p.network()
	env, err := containerEnv(obj, &c.spec, p.n)
	if err != nil {
		return nil, &launchError{"CreateContainerConfigError", false, err}
	}
	argv, err := image(commandLine(&c.spec, env))
	if err != nil {
		return nil, &launchError{"CreateContainerError", true, fmt.Errorf("image %s: %w", c.spec.Image, err)}
	}
	u, err := containerUser(obj, &c.spec)
	if err != nil {
		return nil, &launchError{"CreateContainerConfigError", true, err}
	}
	var mounts []mount
	for _, vm := range c.spec.VolumeMounts {
		if vm.SubPath != "" || vm.SubPathExpr != "" {
			return nil, &launchError{"CreateContainerConfigError", true, fmt.Errorf("volume mount %s: subPath is not supported by k8snode", vm.Name)}
		}
		if !slices.ContainsFunc(obj.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == vm.Name }) {
			return nil, &launchError{"CreateContainerConfigError", true, fmt.Errorf("volume mount %s: no such volume", vm.Name)}
		}
		mounts = append(mounts, mount{src: p.volumeDir(vm.Name), dst: resolvePath(vm.MountPath), readOnly: vm.ReadOnly})
	}
	overlays, mkdirs, binds, err := mountPlan(mounts, func(path string) bool {
		_, err := os.Stat(path)
		return err == nil
	})
	if err != nil {
		return nil, &launchError{"CreateContainerConfigError", true, err}
	}
	scratch := filepath.Join(p.dir, "scratch", c.spec.Name)
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return nil, &launchError{"CreateContainerError", false, err}
	}
	readOnlyRoot := c.spec.SecurityContext != nil && c.spec.SecurityContext.ReadOnlyRootFilesystem != nil && *c.spec.SecurityContext.ReadOnlyRootFilesystem
	script := containerScript(scriptSpec{
		tools: p.n.tools, scratch: scratch, overlays: overlays, mkdirs: mkdirs, binds: binds,
		hosts: filepath.Join("/etc/netns", h.Netns, "hosts"), hostname: hostname(p.name),
		workDir: c.spec.WorkingDir, readOnlyRoot: readOnlyRoot, user: u,
	})

	logPath := p.logPath(c.spec.Name)
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, &launchError{"CreateContainerError", false, err}
	}
	defer logFile.Close()
	// The program's own: it may reopen its output (nginx's /dev/stdout).
	if err := logFile.Chown(int(u.uid), int(u.gid)); err != nil {
		return nil, &launchError{"CreateContainerError", false, err}
	}
	fmt.Fprintf(logFile, "k8snode: %s starting %q as uid %d gid %d\n", time.Now().Format(time.RFC3339Nano), argv, u.uid, u.gid)

	environ := containerEnviron(env, p.name, u.uid)
	args := []string{"netns", "exec", h.Netns, p.n.tools.unshare, "--mount", "--uts", "--propagation", "private", "--",
		p.n.tools.sh, "-c", script, "k8snode-" + c.spec.Name}
	cmd := exec.Command(p.n.tools.ip, append(args, argv...)...)
	cmd.Env = environ
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, to stop the program with what it started;
	// killed if the test process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		return nil, &launchError{"ContainerCreating", false, errors.New("the pod is stopping")}
	}
	if err := cmd.Start(); err != nil {
		return nil, &launchError{"CreateContainerError", false, err}
	}
	proc := &process{container: c.spec.Name, cmd: cmd, pid: cmd.Process.Pid, user: u, env: environ, exited: make(chan struct{})}
	startedAt := time.Now()
	c.proc = proc
	c.id = fmt.Sprintf("k8snode://%s/%d", c.spec.Name, proc.pid)
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1Time(startedAt)}}
	c.started, c.ready = false, false
	p.log.Info("container started", "container", c.spec.Name, "pid", proc.pid, "argv", argv, "uid", u.uid)
	p.n.recorder.Eventf(p.obj, corev1.EventTypeNormal, "Started", "Started container %s", c.spec.Name)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		err := cmd.Wait()
		code := int32(cmd.ProcessState.ExitCode())
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int32(ws.Signal())
		}
		reason := "Completed"
		if code != 0 {
			reason = "Error"
		}
		p.mu.Lock()
		proc.code = code
		c.proc = nil
		c.started, c.ready = false, false
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: metav1Time(startedAt), FinishedAt: metav1Time(time.Now()), ContainerID: c.id,
		}}
		stopped := c.stopped
		p.mu.Unlock()
		if stopped || code == 0 {
			p.log.Info("container exited", "container", c.spec.Name, "exit_code", code)
		} else {
			p.log.Warn("container exited", "container", c.spec.Name, "exit_code", code, "err", err, "log", logPath)
		}
		close(proc.exited)
		p.kickStatus()
	}()
	p.kickStatus()
	return proc, nil
}

// containerEnviron is the process environment: a container runtime's
// defaults, then the container's own.
func containerEnviron(env []envVar, hostname string, uid int64) []string {
	home := "/"
	if uid == 0 {
		home = "/root"
	}
	vars := []envVar{{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, {"HOSTNAME", hostname}, {"HOME", home}}
	for _, e := range env {
		if i := slices.IndexFunc(vars, func(v envVar) bool { return v.name == e.name }); i >= 0 {
			vars[i].value = e.value
		} else {
			vars = append(vars, e)
		}
	}
	out := make([]string, len(vars))
	for i, v := range vars {
		out[i] = v.name + "=" + v.value
	}
	return out
}

// hostname is a pod's host name: its name, within the 63 bytes a host
// name may have.
func hostname(pod string) string {
	if len(pod) > 63 {
		pod = strings.TrimRight(pod[:63], "-.")
	}
	return pod
}

// scriptSpec is what a container's mount namespace needs.
type scriptSpec struct {
	tools            tools
	scratch          string
	overlays, mkdirs []string
	binds            []mount
	hosts, hostname  string
	workDir          string
	readOnlyRoot     bool
	user             user
}

// containerScript is the shell script that runs first in a container's
// private mount and UTS namespaces: it mounts the overlays that let mount
// points be made, the volumes, the pod's hosts file, sets the host name,
// and executes the program ("$@") as the container's user.
func containerScript(s scriptSpec) string {
	q := shQuote
	var b strings.Builder
	line := func(args ...string) { b.WriteString(strings.Join(args, " ") + "\n") }
	line("set -e")
	if len(s.overlays) > 0 {
		line(q(s.tools.mount), "-t", "tmpfs", "-o", "mode=0700", "k8snode", q(s.scratch))
		for i, o := range s.overlays {
			up, work := filepath.Join(s.scratch, "u"+strconv.Itoa(i)), filepath.Join(s.scratch, "w"+strconv.Itoa(i))
			line(q(s.tools.mkdir), q(up), q(work))
			line(q(s.tools.mount), "-t", "overlay", "k8snode", "-o", q("lowerdir="+o+",upperdir="+up+",workdir="+work), q(o))
		}
	}
	for _, m := range s.binds {
		if slices.Contains(s.mkdirs, m.dst) {
			line(q(s.tools.mkdir), "-p", q(m.dst))
			// The node's own directories on the way may be private (an
			// image's would not be there at all): within the overlay,
			// they are opened to the container's user.
			if dirs := parentsWithin(s.overlays, m.dst); len(dirs) > 0 {
				args := []string{q(s.tools.chmod), "a+rx"}
				for _, d := range dirs {
					args = append(args, q(d))
				}
				line(args...)
			}
		}
		line(q(s.tools.mount), "--bind", q(m.src), q(m.dst))
		if m.readOnly {
			line(q(s.tools.mount), "-o", "remount,bind,ro", q(m.dst))
		}
	}
	line(q(s.tools.mount), "--bind", q(s.hosts), "/etc/hosts")
	if s.readOnlyRoot {
		line(q(s.tools.mount), "-o", "remount,bind,ro", "/")
	}
	line(q(s.tools.hostname), q(s.hostname))
	dir := s.workDir
	if dir == "" {
		dir = "/"
	}
	line("cd", q(dir))
	args := append([]string{"exec", q(s.tools.setpriv)}, s.user.setprivArgs()...)
	line(append(args, "--pdeathsig", "KILL", "--", `"$@"`)...)
	return b.String()
}

// parentsWithin lists the directories from the overlay that p is in down
// to p's parent: nil if p is in none.
func parentsWithin(overlays []string, p string) []string {
	for _, o := range overlays {
		if !strings.HasPrefix(p, o+"/") {
			continue
		}
		var dirs []string
		for d := filepath.Dir(p); ; d = filepath.Dir(d) {
			dirs = append(dirs, d)
			if d == o {
				break
			}
		}
		slices.Reverse(dirs)
		return dirs
	}
	return nil
}

// shQuote quotes s for sh.
func shQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
