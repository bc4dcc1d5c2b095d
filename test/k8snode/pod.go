package k8snode

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/trellis-mesh/trellis/internal/localnet"
)

// pod runs one pod bound to the node, from its network namespace to its
// deletion.
type pod struct {
	n               *Node
	uid             types.UID
	namespace, name string
	log             *slog.Logger
	dir             string
	ctx             context.Context // ends when the pod is to stop
	cancel          context.CancelFunc
	done            chan struct{}
	kick            chan struct{} // the status is to be written
	wg              sync.WaitGroup

	mu          sync.Mutex
	obj         *corev1.Pod
	host        *localnet.Host
	grace       time.Duration
	deleting    bool // deleted in the API: delete it for good once stopped
	gone        bool // no longer in the API
	nodeClosing bool
	stopping    bool // containers are being stopped: start none
	completed   bool // every application container has finished for good
	problem     string
	failed      string
	initialized bool
	startTime   metav1.Time
	inits, apps []*container
	condSince   map[corev1.PodConditionType]metav1.Time
	condValue   map[corev1.PodConditionType]bool
	tokens      *tokenCache
	volDigest   map[string]string
	volErr      string
	lastStatus  []byte
}

func newPod(n *Node, obj *corev1.Pod) *pod {
	ctx, cancel := context.WithCancel(n.ctx)
	p := &pod{
		n: n, uid: obj.UID, namespace: obj.Namespace, name: obj.Name,
		log: n.log.With("pod", obj.Namespace+"/"+obj.Name),
		dir: filepath.Join(n.Dir, "pods", obj.Namespace+"_"+obj.Name+"_"+string(obj.UID)[:8]),
		ctx: ctx, cancel: cancel, done: make(chan struct{}), kick: make(chan struct{}, 1),
		obj: obj, condSince: map[corev1.PodConditionType]metav1.Time{}, condValue: map[corev1.PodConditionType]bool{},
		volDigest: map[string]string{},
	}
	p.tokens = &tokenCache{now: time.Now, tokens: map[string]cachedToken{}, request: p.requestToken}
	for _, c := range obj.Spec.InitContainers {
		sidecar := c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
		p.inits = append(p.inits, newContainer(p, c, true, sidecar))
	}
	for _, c := range obj.Spec.Containers {
		p.apps = append(p.apps, newContainer(p, c, false, false))
	}
	return p
}

// update takes the pod's latest version from the informer.
func (p *pod) update(obj *corev1.Pod) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.obj = obj
	if obj.DeletionTimestamp != nil && !p.deleting {
		p.deleting = true
		grace := 30 * time.Second
		if s := obj.DeletionGracePeriodSeconds; s != nil {
			grace = time.Duration(*s) * time.Second
		}
		p.grace = grace
		p.log.Info("pod deleted: stopping it", "grace", grace)
		p.cancel()
	}
}

// vanished: the pod left the API without waiting for the node (a forced
// deletion).
func (p *pod) vanished() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.gone {
		p.gone = true
		if !p.deleting {
			p.grace = time.Second
		}
		p.cancel()
	}
}

// stop stops the pod with at most grace, the node going away: the pod
// stays in the cluster.
func (p *pod) stop(grace time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nodeClosing = true
	if !p.deleting || p.grace > grace {
		p.grace = grace
	}
	p.cancel()
}

func (p *pod) isDone() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *pod) network() *localnet.Host {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.host
}

func (p *pod) problemText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.problem != "" {
		return p.problem
	}
	return p.failed
}

func (p *pod) logPath(container string) string {
	return filepath.Join(p.dir, "logs", container+".log")
}

func (p *pod) volumeDir(name string) string { return filepath.Join(p.dir, "volumes", name) }

// kickStatus asks for the status to be written.
func (p *pod) kickStatus() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// setProblem records why the pod cannot start, with an event.
func (p *pod) setProblem(reason string, err error) {
	p.mu.Lock()
	first := p.problem == ""
	p.problem = fmt.Sprintf("%s: %v", reason, err)
	obj := p.obj
	p.mu.Unlock()
	if first {
		p.log.Error("the pod cannot start", "reason", reason, "err", err)
		p.n.recorder.Eventf(obj, corev1.EventTypeWarning, reason, "%v", err)
	}
	p.kickStatus()
}

// withStatus is the pod as fieldRefs see it: with the addresses the node
// gave it, which the API may not show yet.
func (p *pod) withStatus() *corev1.Pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	obj := p.obj.DeepCopy()
	if p.host != nil {
		ip := p.host.Addr.String()
		obj.Status.PodIP, obj.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		host := p.n.net.HostAddr().String()
		obj.Status.HostIP, obj.Status.HostIPs = host, []corev1.HostIP{{IP: host}}
	}
	if obj.Spec.ServiceAccountName == "" {
		obj.Spec.ServiceAccountName = "default"
	}
	return obj
}

func (p *pod) run() {
	defer close(p.done)
	stopStatus := make(chan struct{})
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		p.statusLoop(stopStatus)
	}()
	p.start()
	<-p.ctx.Done()
	p.teardown()
	close(stopStatus)
	<-statusDone
	p.mu.Lock()
	deleteIt := p.deleting && !p.gone && !p.nodeClosing
	obj := p.obj
	p.mu.Unlock()
	if deleteIt {
		ctx, cancel := context.WithTimeout(p.n.ctx, 10*time.Second)
		if err := p.writeStatus(ctx); err != nil && !apierrors.IsNotFound(err) && ctx.Err() == nil {
			p.log.Error("writing the stopped pod's status failed", "err", err)
		}
		cancel()
		p.n.deletePod(obj)
		p.log.Info("pod stopped and deleted")
	}
}

// start makes the pod's network and volumes, runs its init containers
// and starts its containers; it returns once they run, or when the pod is
// to stop.
func (p *pod) start() {
	p.mu.Lock()
	hostNetwork := p.obj.Spec.HostNetwork
	p.mu.Unlock()
	if hostNetwork {
		p.setProblem("FailedCreatePodSandBox", errors.New("hostNetwork pods are not supported by k8snode"))
		return
	}
	if !p.createNetwork() {
		return
	}
	p.kickStatus()
	if !p.prepareVolumes() {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.syncVolumes()
	}()
	for _, c := range p.inits {
		if c.sidecar {
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				c.supervise(p.ctx)
			}()
			select {
			case <-c.startedOnce:
			case <-p.ctx.Done():
				return
			}
			continue
		}
		if !c.runToCompletion(p.ctx) {
			return
		}
	}
	p.mu.Lock()
	p.initialized = true
	p.mu.Unlock()
	p.kickStatus()
	var apps sync.WaitGroup
	for _, c := range p.apps {
		apps.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer apps.Done()
			c.supervise(p.ctx)
		}()
	}
	// A pod whose containers are not restarted ends when they have: its
	// sidecars are stopped then, as a kubelet does.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		apps.Wait()
		if p.ctx.Err() != nil {
			return
		}
		p.mu.Lock()
		p.completed = true
		p.mu.Unlock()
		p.log.Info("every container has finished: stopping the sidecars")
		p.stopContainers(sidecarsReversed(p.inits), time.Now().Add(30*time.Second))
		p.kickStatus()
	}()
}

func sidecarsReversed(inits []*container) []*container {
	var out []*container
	for _, c := range slices.Backward(inits) {
		if c.sidecar {
			out = append(out, c)
		}
	}
	return out
}

// createNetwork gives the pod its network namespace on the bridge.
func (p *pod) createNetwork() bool {
	for _, dir := range []string{"logs", "volumes", "scratch"} {
		if err := os.MkdirAll(filepath.Join(p.dir, dir), 0o755); err != nil {
			p.setProblem("FailedCreatePodSandBox", err)
			return false
		}
	}
	p.n.mu.Lock()
	hosts := p.n.hostsLocked(p.namespace)
	p.n.mu.Unlock()
	h, err := p.n.net.AddHost(localnet.HostSpec{Name: p.name, Hosts: hosts})
	if err != nil {
		// Another namespace's pod of the same name.
		h, err = p.n.net.AddHost(localnet.HostSpec{Name: p.name + "." + p.namespace, Hosts: hosts})
	}
	if err != nil {
		p.setProblem("FailedCreatePodSandBox", err)
		return false
	}
	p.mu.Lock()
	p.host = h
	p.startTime = metav1.Now()
	p.mu.Unlock()
	// Services may have changed meanwhile.
	p.n.mu.Lock()
	p.hostsChanged()
	p.n.mu.Unlock()
	p.log.Info("pod network created", "ip", h.Addr, "netns", h.Netns)
	return true
}

// hostsChanged rewrites the pod's hosts file; the node's lock is held.
func (p *pod) hostsChanged() {
	h := p.network()
	if h == nil {
		return
	}
	if err := h.SetHosts(p.n.hostsLocked(p.namespace)); err != nil {
		p.log.Warn("updating the hosts file failed", "err", err)
	}
}

// prepareVolumes makes the pod's volumes, waiting for the ConfigMaps and
// Secrets they need, as a kubelet does before it starts a container.
func (p *pod) prepareVolumes() bool {
	p.mu.Lock()
	vols := p.obj.Spec.Volumes
	p.mu.Unlock()
	for _, v := range vols {
		if err := supported(v); err != nil {
			p.setProblem("FailedMount", err)
			return false
		}
	}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	warned := false
	for {
		err := p.writeVolumes()
		if err == nil {
			return true
		}
		if !warned {
			warned = true
			p.log.Info("waiting to mount the pod's volumes", "err", err)
			p.mu.Lock()
			obj := p.obj
			p.mu.Unlock()
			p.n.recorder.Eventf(obj, corev1.EventTypeWarning, "FailedMount", "%v", err)
		}
		select {
		case <-p.ctx.Done():
			return false
		case <-t.C:
		}
	}
}

// syncVolumes keeps the volumes current: annotations and ConfigMaps
// change, tokens are renewed.
func (p *pod) syncVolumes() {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
		}
		err := p.writeVolumes()
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		p.mu.Lock()
		changed := msg != p.volErr
		p.volErr = msg
		p.mu.Unlock()
		if changed && err != nil {
			p.log.Warn("updating the pod's volumes failed; the old content stays", "err", err)
		}
	}
}

// writeVolumes writes every volume whose content changed.
func (p *pod) writeVolumes() error {
	obj := p.withStatus()
	src := volumeSource{pod: obj, l: p.n, tokens: func(name string, proj *corev1.ServiceAccountTokenProjection) ([]byte, error) {
		return p.tokens.get(p.ctx, name, proj)
	}}
	var errs []error
	for _, v := range obj.Spec.Volumes {
		dir := p.volumeDir(v.Name)
		if v.EmptyDir != nil {
			if err := os.MkdirAll(dir, 0o777); err != nil {
				errs = append(errs, err)
			} else if err := os.Chmod(dir, 0o777); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		files, err := src.files(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", v.Name, err))
			continue
		}
		d := digest(files)
		p.mu.Lock()
		same := p.volDigest[v.Name] == d
		p.mu.Unlock()
		if same {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := writeVolume(dir, files, time.Now()); err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", v.Name, err))
			continue
		}
		p.mu.Lock()
		p.volDigest[v.Name] = d
		p.mu.Unlock()
	}
	return errors.Join(errs...)
}

func (p *pod) requestToken(ctx context.Context, audiences []string, seconds int64) (*authenticationv1.TokenRequest, error) {
	obj := p.withStatus()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return p.n.client.CoreV1().ServiceAccounts(obj.Namespace).CreateToken(ctx, obj.Spec.ServiceAccountName, tokenRequest(obj, audiences, seconds), metav1.CreateOptions{})
}

// teardown stops the containers — the application's first, then the
// sidecars in reverse order — within the grace period, and removes what
// was made for the pod; its containers' output stays until the test ends.
func (p *pod) teardown() {
	p.mu.Lock()
	p.stopping = true
	grace := p.grace
	p.mu.Unlock()
	deadline := time.Now().Add(grace)
	// The application's containers, or the init container running
	// instead of them.
	first := slices.Clone(p.apps)
	for _, c := range p.inits {
		if !c.sidecar {
			first = append(first, c)
		}
	}
	p.stopContainers(first, deadline)
	// Sidecars get what is left of the grace period, and at least 2s, as
	// a kubelet gives them.
	p.stopContainers(sidecarsReversed(p.inits), later(deadline, time.Now().Add(2*time.Second)))
	waited := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(waited)
	}()
	select {
	case <-waited:
	case <-time.After(30 * time.Second):
		p.log.Error("the pod's goroutines did not end within 30s of its containers")
	}
	h := p.network()
	if h != nil {
		// Anything its containers left behind (they had their own
		// process groups, but a program may start others).
		if out, err := exec.Command(p.n.tools.ip, "netns", "pids", h.Netns).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					p.log.Warn("killing a process left in the pod's network namespace", "pid", pid)
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		if err := p.n.net.RemoveHost(h); err != nil {
			p.log.Error("removing the pod's network failed", "err", err)
			p.n.t.Errorf("k8snode: pod %s/%s: %v", p.namespace, p.name, err)
		}
	}
	for _, dir := range []string{"volumes", "scratch"} {
		if err := os.RemoveAll(filepath.Join(p.dir, dir)); err != nil {
			p.log.Error("removing the pod's files failed", "err", err)
		}
	}
	p.log.Info("pod stopped", "grace", grace)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// stopContainers sends SIGTERM to the running containers of cs, and
// SIGKILL to those still running at deadline.
func (p *pod) stopContainers(cs []*container, deadline time.Time) {
	var procs []*process
	p.mu.Lock()
	obj := p.obj
	for _, c := range cs {
		if c.proc != nil {
			procs = append(procs, c.proc)
			c.stopped = true
		}
	}
	p.mu.Unlock()
	for _, proc := range procs {
		p.n.recorder.Eventf(obj, corev1.EventTypeNormal, "Killing", "Stopping container %s", proc.container)
		proc.signal(syscall.SIGTERM)
	}
	for _, proc := range procs {
		select {
		case <-proc.exited:
			continue
		case <-time.After(time.Until(deadline)):
		}
		p.log.Warn("container still running at the end of its grace period: SIGKILL", "container", proc.container)
		proc.signal(syscall.SIGKILL)
		select {
		case <-proc.exited:
		case <-time.After(10 * time.Second):
			p.log.Error("container still running 10s after SIGKILL", "container", proc.container, "pid", proc.pid)
		}
	}
}

// statusLoop writes the pod's status whenever it changes.
func (p *pod) statusLoop(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-p.kick:
		}
		ctx, cancel := context.WithTimeout(p.n.ctx, 10*time.Second)
		err := p.writeStatus(ctx)
		cancel()
		if err != nil && !apierrors.IsNotFound(err) && p.n.ctx.Err() == nil {
			p.log.Warn("writing the pod's status failed; retrying", "err", err)
			time.AfterFunc(time.Second, p.kickStatus)
		}
	}
}

// writeStatus patches the pod's status with what the node knows.
func (p *pod) writeStatus(ctx context.Context) error {
	body, err := json.Marshal(map[string]any{"status": p.status(time.Now())})
	if err != nil {
		return err
	}
	p.mu.Lock()
	last := p.lastStatus
	p.mu.Unlock()
	if bytes.Equal(body, last) {
		return nil
	}
	_, err = p.n.client.CoreV1().Pods(p.namespace).Patch(ctx, p.name, types.MergePatchType, body, metav1.PatchOptions{}, "status")
	if err == nil {
		p.mu.Lock()
		p.lastStatus = body
		p.mu.Unlock()
	}
	return err
}

// status is the pod's status as a kubelet reports it.
func (p *pod) status(now time.Time) corev1.PodStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	snap := podSnap{
		RestartPolicy: p.obj.Spec.RestartPolicy,
		SandboxReady:  p.host != nil && !p.stopping,
		Initialized:   p.initialized,
		Failed:        p.failed,
	}
	for _, c := range p.inits {
		snap.Inits = append(snap.Inits, c.snapLocked())
	}
	for _, c := range p.apps {
		snap.Apps = append(snap.Apps, c.snapLocked())
	}
	st := corev1.PodStatus{Phase: podPhase(snap)}
	if p.host != nil {
		ip, host := p.host.Addr.String(), p.n.net.HostAddr().String()
		st.PodIP, st.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		st.HostIP, st.HostIPs = host, []corev1.HostIP{{IP: host}}
		st.StartTime = &p.startTime
	}
	conds := podConditions(snap)
	for _, typ := range conditionOrder {
		v := conds[typ]
		if old, ok := p.condValue[typ]; !ok || old != v {
			p.condValue[typ] = v
			p.condSince[typ] = metav1.NewTime(now)
		}
		c := corev1.PodCondition{Type: typ, Status: corev1.ConditionFalse, LastTransitionTime: p.condSince[typ]}
		if v {
			c.Status = corev1.ConditionTrue
		} else if (typ == corev1.PodReady || typ == corev1.ContainersReady) && snap.Initialized {
			c.Reason = "ContainersNotReady"
		}
		st.Conditions = append(st.Conditions, c)
	}
	if p.failed != "" {
		st.Reason, st.Message = "InitContainerFailed", p.failed
	}
	for _, c := range snap.Inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, containerStatus(c))
	}
	for _, c := range snap.Apps {
		st.ContainerStatuses = append(st.ContainerStatuses, containerStatus(c))
	}
	return st
}

// command runs args in a running container's namespaces, as its user.
func (p *pod) command(ctx context.Context, name string, args []string) (*exec.Cmd, error) {
	p.mu.Lock()
	var c *container
	for _, x := range append(slices.Clone(p.inits), p.apps...) {
		if x.spec.Name == name {
			c = x
		}
	}
	if c == nil {
		p.mu.Unlock()
		return nil, fmt.Errorf("k8snode: pod %s/%s has no container %s", p.namespace, p.name, name)
	}
	proc := c.proc
	p.mu.Unlock()
	if proc == nil {
		return nil, fmt.Errorf("k8snode: container %s of pod %s/%s is not running", name, p.namespace, p.name)
	}
	nsArgs := []string{"--target", strconv.Itoa(proc.pid), "--mount", "--uts", "--net", "--", p.n.tools.setpriv}
	nsArgs = append(nsArgs, proc.user.setprivArgs()...)
	cmd := exec.CommandContext(ctx, p.n.tools.nsenter, append(append(nsArgs, "--"), args...)...)
	cmd.Env = proc.env
	return cmd, nil
}

// addr is the pod's IP address, if it has one.
func (p *pod) addr() (netip.Addr, bool) {
	h := p.network()
	if h == nil {
		return netip.Addr{}, false
	}
	return h.Addr, true
}
