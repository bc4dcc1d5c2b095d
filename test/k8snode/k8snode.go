// Package k8snode plays a node's kubelet for the pods of a test cluster
// (test/k8senv, which has no scheduler and no kubelet). It registers a
// Node, binds every unscheduled pod to it, and runs each pod bound to it
// as processes on this machine: a network namespace per pod with its own
// address on a bridge (in the benchmarking range 198.18.0.0/15, with no
// route off the machine and no NAT; the cluster's service range routed
// into the pod, so that a connect() to a ClusterIP reaches the pod's own
// OUTPUT chain); a private mount namespace per container with the pod's
// volumes at their mount paths; init containers in order, native
// sidecars gated on their startup probes, then the application's
// containers; probes polled; and the pod's status written back as a
// kubelet writes it. A deleted pod's containers get SIGTERM (the
// application's first, then the sidecars), SIGKILL after the grace
// period, and everything made for the pod is removed before the pod is
// deleted for good.
//
// Images are not pulled: Config.Images maps each image to a program of
// this machine. There is no kube-proxy: a ClusterIP answers only through a
// sidecar that intercepts it.
//
// This is test code, not product. It needs root (network namespaces,
// mounts, iptables inside the pods), and the ip, unshare, nsenter, setpriv
// and mount commands.
package k8snode

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/trellis-mesh/trellis/internal/localnet"
	"github.com/trellis-mesh/trellis/test/k8senv"
)

// Image stands for a container image: it returns the command line that
// runs container c, whose Command and Args have their $(VAR) references
// expanded. An error fails the container.
type Image func(c corev1.Container) ([]string, error)

// Program is an image whose entrypoint is entrypoint: a container's
// command replaces it and the container's args follow, as with a
// container image's ENTRYPOINT and CMD.
func Program(entrypoint ...string) Image {
	return func(c corev1.Container) ([]string, error) {
		argv := entrypoint
		if len(c.Command) > 0 {
			argv = c.Command
		}
		if len(argv) == 0 {
			return nil, errors.New("no command: the image has no entrypoint and the container gives no command")
		}
		return append(slices.Clone(argv), c.Args...), nil
	}
}

// Config describes a node.
type Config struct {
	// Kubeconfig is the cluster's kubeconfig file (k8senv.Env.Kubeconfig).
	Kubeconfig string
	// Name is the Node's name; "k8snode" unless set.
	Name string
	// Images maps each image pods may use to a program. A container of
	// any other image is not started: it waits with reason ErrImagePull
	// and an event that says so.
	Images map[string]Image
	// HostNames resolve, in every pod, to the host's side of the bridge
	// (Node.HostAddr), where the test's own servers listen: for example
	// trellis-control-plane.trellis-system.svc.
	HostNames []string
	// ServiceCIDR is the cluster's service range, routed into every pod;
	// k8senv.ServiceCIDR unless set.
	ServiceCIDR netip.Prefix
	// Log receives the node's log; the test's log unless set.
	Log *slog.Logger
}

// ClusterDomain is the suffix of Services' names in pods' hosts files.
const ClusterDomain = "cluster.local"

// Node is a running node.
type Node struct {
	// Name is the Node object's name.
	Name string
	// Dir holds each pod's volumes and its containers' output
	// (pods/NAMESPACE_NAME_UID/logs/CONTAINER.log); it is outside /tmp,
	// which pods commonly mount a volume over.
	Dir string

	t        testing.TB
	cfg      Config
	client   kubernetes.Interface
	log      *slog.Logger
	tools    tools
	net      *localnet.Network
	prefix   string
	recorder record.EventRecorder
	events   record.EventBroadcaster
	factory  informers.SharedInformerFactory
	ctx      context.Context
	cancel   context.CancelFunc

	mu       sync.Mutex
	closed   bool
	pods     map[types.UID]*pod
	binding  map[types.UID]bool
	services map[types.NamespacedName]netip.Addr
	wg       sync.WaitGroup
}

// tools are the commands the node runs, by absolute path: a container's
// environment may have a PATH of its own.
type tools struct {
	ip, unshare, nsenter, setpriv, sh, mount, mkdir, chmod, hostname string
}

func findTools() (tools, error) {
	var t tools
	var missing []string
	for _, x := range []struct {
		name string
		p    *string
	}{{"ip", &t.ip}, {"unshare", &t.unshare}, {"nsenter", &t.nsenter}, {"setpriv", &t.setpriv}, {"sh", &t.sh}, {"mount", &t.mount}, {"mkdir", &t.mkdir}, {"chmod", &t.chmod}, {"hostname", &t.hostname}} {
		p, err := exec.LookPath(x.name)
		if err != nil {
			missing = append(missing, x.name)
			continue
		}
		if *x.p, err = filepath.Abs(p); err != nil {
			return t, err
		}
	}
	if len(missing) > 0 {
		return t, fmt.Errorf("missing commands: %s", strings.Join(missing, ", "))
	}
	return t, nil
}

// Available reports why this machine cannot run a node, or nil: it needs
// root and the commands the node runs.
func Available() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("k8snode needs Linux, this is %s", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		return errors.New("k8snode needs root: network namespaces, mounts and iptables")
	}
	if _, err := findTools(); err != nil {
		return fmt.Errorf("k8snode: %w", err)
	}
	return localnet.Available()
}

// Start registers the node and runs the cluster's pods until the test
// ends; then it stops every process, and removes every namespace, link,
// mount and directory it made (and checks that none is left).
func Start(t testing.TB, cfg Config) *Node {
	t.Helper()
	if err := Available(); err != nil {
		t.Fatal(err)
	}
	if cfg.Name == "" {
		cfg.Name = "k8snode"
	}
	if !cfg.ServiceCIDR.IsValid() {
		cfg.ServiceCIDR = netip.MustParsePrefix(k8senv.ServiceCIDR)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	tl, err := findTools()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		t.Fatalf("k8snode: %v", err)
	}
	// A kubelet's rate: token requests, status patches and lookups of
	// every pod go through this client.
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatalf("k8snode: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &Node{
		Name: cfg.Name, t: t, cfg: cfg, client: client, log: cfg.Log.With("node", cfg.Name), tools: tl,
		ctx: ctx, cancel: cancel,
		pods: map[types.UID]*pod{}, binding: map[types.UID]bool{}, services: map[types.NamespacedName]netip.Addr{},
	}
	t.Cleanup(n.shutdown)

	// Not under /tmp: pods mount volumes there, which would hide the
	// volumes' own directories from the container being set up.
	if n.Dir, err = os.MkdirTemp("/var/tmp", "k8snode-"); err != nil {
		t.Fatalf("k8snode: %v", err)
	}
	if err := os.Chmod(n.Dir, 0o755); err != nil {
		t.Fatalf("k8snode: %v", err)
	}
	if n.net, n.prefix, err = createNetwork(cfg.ServiceCIDR, n.log); err != nil {
		t.Fatalf("k8snode: %v", err)
	}
	if err := n.register(ctx); err != nil {
		t.Fatalf("k8snode: register node %s: %v", n.Name, err)
	}
	n.events = record.NewBroadcaster(record.WithContext(ctx))
	n.events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	n.recorder = n.events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: n.Name})

	n.factory = informers.NewSharedInformerFactory(client, 0)
	pods := n.factory.Core().V1().Pods().Informer()
	services := n.factory.Core().V1().Services().Informer()
	if _, err := services.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.serviceChanged(obj, false) },
		UpdateFunc: func(_, obj any) { n.serviceChanged(obj, false) },
		DeleteFunc: func(obj any) { n.serviceChanged(obj, true) },
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.podChanged(obj, false) },
		UpdateFunc: func(_, obj any) { n.podChanged(obj, false) },
		DeleteFunc: func(obj any) { n.podChanged(obj, true) },
	}); err != nil {
		t.Fatal(err)
	}
	n.factory.Start(ctx.Done())
	syncCtx, cancelSync := context.WithTimeout(ctx, 30*time.Second)
	defer cancelSync()
	for typ, ok := range n.factory.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			t.Fatalf("k8snode: the %v informer did not sync within 30s", typ)
		}
	}
	n.log.Info("node ready", "bridge_addr", n.net.HostAddr(), "dir", n.Dir, "netns_prefix", n.prefix)
	return n
}

// HostAddr is the host's address on the bridge, which pods reach; the
// names of Config.HostNames resolve to it.
func (n *Node) HostAddr() netip.Addr { return n.net.HostAddr() }

// createNetwork makes the bridge, in a /24 of 198.19.128.0/17 (the
// benchmarking range, clear of k8senv's service range and of trellis up's
// default subnet), with a prefix of its own; it tries others if another
// test holds the one it drew.
func createNetwork(serviceCIDR netip.Prefix, log *slog.Logger) (*localnet.Network, string, error) {
	var errs []error
	for range 10 {
		prefix := "kn" + strings.ToLower(rand.Text()[:5])
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(128 + mrand.IntN(128)), 0}), 24)
		nw, err := localnet.Create(localnet.Config{Prefix: prefix, Subnet: subnet, ServiceRange: serviceCIDR, Log: log})
		if err == nil {
			return nw, prefix, nil
		}
		if !errors.Is(err, localnet.ErrSubnetInUse) && !errors.Is(err, localnet.ErrPrefixInUse) {
			return nil, "", err
		}
		errs = append(errs, err)
	}
	return nil, "", fmt.Errorf("no free subnet: %w", errors.Join(errs...))
}

// register creates the Node object, Ready, with the bridge's address.
func (n *Node) register(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nodes := n.client.CoreV1().Nodes()
	node, err := nodes.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   n.Name,
		Labels: map[string]string{"kubernetes.io/hostname": n.Name, "kubernetes.io/os": "linux", "kubernetes.io/arch": runtime.GOARCH},
	}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("8"),
		corev1.ResourceMemory: resource.MustParse("16Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	node.Status = corev1.NodeStatus{
		Capacity: capacity, Allocatable: capacity,
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "k8snode is posting ready status",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.net.HostAddr().String()}, {Type: corev1.NodeHostName, Address: n.Name}},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion: "v1.34.4-k8snode", OperatingSystem: "linux", Architecture: runtime.GOARCH,
			ContainerRuntimeVersion: "k8snode://1",
		},
	}
	_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// podChanged follows the informer: binds unscheduled pods, runs the pods
// bound here, and tells them when they are deleted.
func (n *Node) podChanged(obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	if p := n.pods[pod.UID]; p != nil {
		if deleted {
			p.vanished()
		} else {
			p.update(pod)
		}
		return
	}
	switch {
	case deleted:
	case pod.Spec.NodeName == "":
		if pod.DeletionTimestamp == nil && !n.binding[pod.UID] {
			n.binding[pod.UID] = true
			n.wg.Add(1)
			go func() {
				defer n.wg.Done()
				n.bind(pod)
			}()
		}
	case pod.Spec.NodeName != n.Name:
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
	case pod.DeletionTimestamp != nil:
		// Bound here but never run: nothing to stop.
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.deletePod(pod)
		}()
	default:
		p := newPod(n, pod)
		n.pods[pod.UID] = p
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			p.run()
		}()
	}
}

// bind is the scheduler's part: every pod goes to this node.
func (n *Node) bind(pod *corev1.Pod) {
	ctx, cancel := context.WithTimeout(n.ctx, 30*time.Second)
	defer cancel()
	err := n.client.CoreV1().Pods(pod.Namespace).Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: n.Name},
	}, metav1.CreateOptions{})
	switch {
	case err == nil:
		n.recorder.Eventf(pod, corev1.EventTypeNormal, "Scheduled", "Successfully assigned %s/%s to %s", pod.Namespace, pod.Name, n.Name)
	case apierrors.IsNotFound(err), apierrors.IsConflict(err), ctx.Err() != nil:
	default:
		n.log.Error("binding a pod failed", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

// deletePod deletes a pod for good, as a kubelet does once its
// containers have stopped.
func (n *Node) deletePod(pod *corev1.Pod) {
	ctx, cancel := context.WithTimeout(n.ctx, 30*time.Second)
	defer cancel()
	err := n.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64),
		Preconditions:      metav1.NewUIDPreconditions(string(pod.UID)),
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && ctx.Err() == nil {
		n.log.Error("deleting a stopped pod failed", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

// serviceChanged keeps every pod's hosts file naming the cluster's
// Services.
func (n *Node) serviceChanged(obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	n.mu.Lock()
	defer n.mu.Unlock()
	if deleted || err != nil {
		if _, ok := n.services[key]; !ok {
			return
		}
		delete(n.services, key)
	} else {
		if n.services[key] == ip {
			return
		}
		n.services[key] = ip
	}
	for _, p := range n.pods {
		p.hostsChanged()
	}
}

// hostsLocked is the hosts file's entries for a pod of namespace: each
// Service as name.ns.svc.cluster.local, name.ns.svc and name.ns, and by
// its bare name in the pod's own namespace (a resolver's search path);
// and the host's names.
func (n *Node) hostsLocked(namespace string) map[string]netip.Addr {
	return hostsEntries(n.cfg.HostNames, n.net.HostAddr(), n.services, namespace)
}

func hostsEntries(hostNames []string, hostAddr netip.Addr, services map[types.NamespacedName]netip.Addr, namespace string) map[string]netip.Addr {
	out := map[string]netip.Addr{}
	for k, ip := range services {
		for _, name := range []string{k.Name + "." + k.Namespace + ".svc." + ClusterDomain, k.Name + "." + k.Namespace + ".svc", k.Name + "." + k.Namespace} {
			out[name] = ip
		}
		if k.Namespace == namespace {
			out[k.Name] = ip
		}
	}
	// The test's servers win over a Service of the same name: the
	// control plane's, say, which runs out of the cluster.
	for _, h := range hostNames {
		out[h] = hostAddr
	}
	return out
}

// lookPod finds the running pod namespace/name.
func (n *Node) lookPod(namespace, name string) (*pod, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var found *pod
	for _, p := range n.pods {
		if p.namespace == namespace && p.name == name && !p.isDone() {
			found = p
		}
	}
	if found == nil {
		return nil, fmt.Errorf("k8snode: no pod %s/%s runs on %s", namespace, name, n.Name)
	}
	return found, nil
}

// Netns is the network namespace of pod namespace/name, for `ip netns
// exec`.
func (n *Node) Netns(namespace, name string) (string, error) {
	p, err := n.lookPod(namespace, name)
	if err != nil {
		return "", err
	}
	h := p.network()
	if h == nil {
		return "", fmt.Errorf("k8snode: pod %s/%s has no network yet", namespace, name)
	}
	return h.Netns, nil
}

// NetnsPrefix starts the names of every network namespace and link the
// node makes.
func (n *Node) NetnsPrefix() string { return n.prefix + "-" }

// Command returns a command that runs args as `kubectl exec` would, in
// container's namespaces (network, mounts with its volumes, host name) of
// pod namespace/name, as the container's user. The container must be
// running.
func (n *Node) Command(ctx context.Context, namespace, name, container string, args ...string) (*exec.Cmd, error) {
	p, err := n.lookPod(namespace, name)
	if err != nil {
		return nil, err
	}
	return p.command(ctx, container, args)
}

// Log returns what a container of pod namespace/name wrote so far.
func (n *Node) Log(namespace, name, container string) (string, error) {
	p, err := n.lookPod(namespace, name)
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(p.logPath(container))
	return string(data), err
}

// WaitReady waits until count pods of namespace matching selector (a
// label selector) are Ready and not being deleted, and returns them. It
// returns early with the reason when one of them cannot start (an unknown
// image, a volume the node cannot make, a failed init container).
func (n *Node) WaitReady(ctx context.Context, namespace, selector string, count int) ([]corev1.Pod, error) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var last string
	for {
		list, err := n.client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err == nil {
			var ready []corev1.Pod
			var states []string
			for _, pod := range list.Items {
				if pod.DeletionTimestamp != nil {
					continue
				}
				if problem := n.problem(pod.UID); problem != "" {
					return nil, fmt.Errorf("pod %s/%s cannot run: %s", pod.Namespace, pod.Name, problem)
				}
				if isReady(&pod) {
					ready = append(ready, pod)
				}
				states = append(states, describePod(&pod))
			}
			if len(ready) >= count {
				sort.Slice(ready, func(i, j int) bool { return ready[i].Name < ready[j].Name })
				return ready, nil
			}
			last = fmt.Sprintf("%d of %d ready: %s", len(ready), count, strings.Join(states, "; "))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %d ready pods %q in %s: %w (%s)%s", count, selector, namespace, ctx.Err(), last, n.restartReport(namespace))
		case <-t.C:
		}
	}
}

// restartReport shows the last output of the containers of namespace
// that have restarted, for a message.
func (n *Node) restartReport(namespace string) string {
	n.mu.Lock()
	var pods []*pod
	for _, p := range n.pods {
		if p.namespace == namespace && !p.isDone() {
			pods = append(pods, p)
		}
	}
	n.mu.Unlock()
	var b strings.Builder
	for _, p := range pods {
		p.mu.Lock()
		var restarted []string
		for _, c := range append(slices.Clone(p.inits), p.apps...) {
			if c.restarts > 0 {
				restarted = append(restarted, c.spec.Name)
			}
		}
		p.mu.Unlock()
		for _, c := range restarted {
			data, _ := os.ReadFile(p.logPath(c))
			lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			if len(lines) > 6 {
				lines = lines[len(lines)-6:]
			}
			fmt.Fprintf(&b, "\ncontainer %s of %s/%s restarted; its last output:\n%s", c, p.namespace, p.name, strings.Join(lines, "\n"))
		}
	}
	return b.String()
}

func isReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// describePod is a pod's state in a line, for messages.
func describePod(pod *corev1.Pod) string {
	var cs []string
	for _, st := range append(slices.Clone(pod.Status.InitContainerStatuses), pod.Status.ContainerStatuses...) {
		s := "?"
		switch {
		case st.State.Running != nil:
			s = "running"
		case st.State.Terminated != nil:
			s = fmt.Sprintf("terminated(%d)", st.State.Terminated.ExitCode)
		case st.State.Waiting != nil:
			s = "waiting(" + st.State.Waiting.Reason + ")"
		}
		cs = append(cs, fmt.Sprintf("%s %s ready=%v", st.Name, s, st.Ready))
	}
	return fmt.Sprintf("%s %s [%s]", pod.Name, pod.Status.Phase, strings.Join(cs, ", "))
}

// problem is why a pod the node runs cannot start, if it cannot.
func (n *Node) problem(uid types.UID) string {
	n.mu.Lock()
	p := n.pods[uid]
	n.mu.Unlock()
	if p == nil {
		return ""
	}
	return p.problemText()
}

// shutdown stops every pod (without deleting it from the cluster, as a
// node going away does), then removes the network and the node's
// directory, and fails the test if anything is left.
func (n *Node) shutdown() {
	n.mu.Lock()
	n.closed = true
	pods := slices.Collect(func(yield func(*pod) bool) {
		for _, p := range n.pods {
			if !yield(p) {
				return
			}
		}
	})
	n.mu.Unlock()
	for _, p := range pods {
		p.stop(5 * time.Second)
	}
	done := make(chan struct{})
	go func() {
		n.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		n.t.Errorf("k8snode: pods still stopping 60s after the test ended")
	}
	if n.t.Failed() {
		n.logTails()
	}
	if n.net != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := n.client.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			n.log.Debug("deleting the Node object failed (the cluster may be gone)", "err", err)
		}
		cancel()
	}
	n.cancel()
	if n.factory != nil {
		n.factory.Shutdown()
	}
	if n.events != nil {
		n.events.Shutdown()
	}
	if n.net != nil {
		if err := n.net.Close(); err != nil {
			n.t.Errorf("k8snode: %v", err)
		}
		if left := n.leftovers(); len(left) > 0 {
			n.t.Errorf("k8snode: left on the machine: %s", strings.Join(left, "; "))
		}
	}
	if n.Dir != "" {
		if err := os.RemoveAll(n.Dir); err != nil {
			n.t.Errorf("k8snode: %v", err)
		}
	}
}

// leftovers lists what of the node is still on the machine.
func (n *Node) leftovers() []string {
	var out []string
	ns, _ := exec.Command(n.tools.ip, "netns", "list").Output()
	links, _ := exec.Command(n.tools.ip, "-o", "link", "show").Output()
	for l := range strings.Lines(string(ns) + string(links)) {
		if strings.Contains(l, n.NetnsPrefix()) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	dirs, _ := filepath.Glob("/etc/netns/" + n.NetnsPrefix() + "*")
	return append(out, dirs...)
}

// logTails logs the end of every container's output.
func (n *Node) logTails() {
	logs, _ := filepath.Glob(filepath.Join(n.Dir, "pods", "*", "logs", "*.log"))
	for _, f := range logs {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		rel, _ := filepath.Rel(filepath.Join(n.Dir, "pods"), f)
		n.t.Logf("k8snode: last lines of %s:\n%s", rel, strings.Join(lines, "\n"))
	}
}

// configMap and secret implement lookups against the cluster.
func (n *Node) configMap(namespace, name string) (map[string][]byte, error) {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	cm, err := n.client.CoreV1().ConfigMaps(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("configmap %s/%s: %w", namespace, name, errNotFound)
	}
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for k, v := range cm.Data {
		out[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		out[k] = v
	}
	return out, nil
}

func (n *Node) secret(namespace, name string) (map[string][]byte, error) {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	s, err := n.client.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("secret %s/%s: %w", namespace, name, errNotFound)
	}
	if err != nil {
		return nil, err
	}
	return s.Data, nil
}
