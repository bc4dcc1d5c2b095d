// Package workloads tells the control plane's registry which workloads and
// services a Kubernetes cluster has: the injected pods, grouped into the
// workloads their proxies claim, each with its pods' names and addresses;
// and the Services that select them, with their ClusterIPs and ports.
//
// What a proxy may claim comes from here, never from the proxy: a pod's
// service account, labels and IP are the API server's.
package workloads

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/meshid"
	proxyconfig "github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Labels Kubernetes controllers add to tell revisions apart; a policy or
// service selecting them would select one rollout step.
var revisionLabels = []string{"pod-template-hash", "controller-revision-hash"}

// Declarations computes the registry's declarations from the cluster's
// pods and services.
func Declarations(td spiffeid.TrustDomain, pods []*corev1.Pod, services []*corev1.Service, log *slog.Logger) registry.Declarations {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	type member struct {
		pod *corev1.Pod
		cfg *proxyconfig.Config
	}
	byWorkload := map[string][]member{}
	for _, p := range pods {
		if p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed || !inject.Injected(&p.Spec) {
			continue
		}
		cfg, err := proxyconfig.ParseIn([]byte(p.Annotations[inject.ProxyConfigAnnotation]), p.Namespace)
		if err != nil {
			log.Warn("injected pod with an invalid proxy configuration: its proxy cannot join", "pod", p.Namespace+"/"+p.Name, "annotation", inject.ProxyConfigAnnotation, "err", err)
			continue
		}
		k := p.Namespace + "/" + cfg.Workload.Name
		byWorkload[k] = append(byWorkload[k], member{p, cfg})
	}

	var d registry.Declarations
	for _, k := range slices.Sorted(maps.Keys(byWorkload)) {
		ms := byWorkload[k]
		// The newest pod with an address speaks for the workload (labels,
		// service account, ports): during a rollout, the revision being
		// rolled out, once it runs. A pod still pending does not.
		slices.SortFunc(ms, func(a, b member) int {
			aIP, bIP := a.pod.Status.PodIP != "", b.pod.Status.PodIP != ""
			if aIP != bIP {
				if aIP {
					return 1
				}
				return -1
			}
			return cmp.Or(a.pod.CreationTimestamp.Compare(b.pod.CreationTimestamp.Time), strings.Compare(a.pod.Name, b.pod.Name))
		})
		newest := ms[len(ms)-1]
		w := registry.Workload{
			Namespace:      newest.pod.Namespace,
			Name:           newest.cfg.Workload.Name,
			ServiceAccount: serviceAccount(newest.pod),
			Labels:         workloadLabels(newest.pod.Labels),
			Instances:      map[string]registry.DeclaredInstance{},
		}
		for _, in := range newest.cfg.Inbound {
			w.Ports = append(w.Ports, registry.WorkloadPort{Port: in.AppPort, Protocol: string(in.Protocol)})
		}
		// Every pod with an address, each with its own service account.
		for _, m := range ms {
			if ip, err := netip.ParseAddr(m.pod.Status.PodIP); err == nil {
				di := registry.DeclaredInstance{IP: ip.Unmap(), ServiceAccount: serviceAccount(m.pod), Ready: podReady(m.pod)}
				if id, err := meshid.Workload(td, m.pod.Namespace, di.ServiceAccount); err == nil {
					di.Identity = id.String()
				}
				w.Instances[m.pod.Name] = di
			}
		}
		d.Workloads = append(d.Workloads, w)
	}

	for _, s := range services {
		if len(s.Spec.Selector) == 0 || s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		// A service of no meshed workload is not the mesh's: its traffic
		// passes through (kube-dns over TCP, namespaces outside the mesh).
		if !slices.ContainsFunc(d.Workloads, func(w registry.Workload) bool {
			return w.Namespace == s.Namespace && registry.Selects(s.Spec.Selector, w.Labels)
		}) {
			continue
		}
		rs := registry.Service{Namespace: s.Namespace, Name: s.Name, Selector: s.Spec.Selector}
		if ip, err := netip.ParseAddr(s.Spec.ClusterIP); err == nil {
			rs.Address = ip.String()
		}
		for _, sp := range s.Spec.Ports {
			if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
				continue
			}
			target, ok := targetPort(sp, s, pods)
			if !ok {
				log.Warn("service port with a named targetPort no selected pod declares: left out", "service", s.Namespace+"/"+s.Name, "port", sp.Port, "targetPort", sp.TargetPort.String())
				continue
			}
			proto := proxyconfig.ParseProtocol(ptrValue(sp.AppProtocol))
			if proto == proxyconfig.ProtocolSniff {
				proto = proxyconfig.ParseProtocol(sp.Name)
			}
			rs.Ports = append(rs.Ports, registry.ServicePort{Name: sp.Name, Port: uint32(sp.Port), TargetPort: target, Protocol: string(proto)})
		}
		d.Services = append(d.Services, rs)
	}
	slices.SortFunc(d.Services, func(a, b registry.Service) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return d
}

// podReady reports the pod's Ready condition: the application's
// readiness, as the kubelet judges it.
func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func serviceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

func workloadLabels(l map[string]string) map[string]string {
	out := make(map[string]string, len(l))
	for k, v := range l {
		if !slices.Contains(revisionLabels, k) {
			out[k] = v
		}
	}
	return out
}

// targetPort resolves a service port's target: a number, or the name of a
// container port of a pod the service selects.
func targetPort(sp corev1.ServicePort, s *corev1.Service, pods []*corev1.Pod) (uint32, bool) {
	switch {
	case sp.TargetPort.StrVal == "" && sp.TargetPort.IntVal == 0:
		return uint32(sp.Port), true
	case sp.TargetPort.StrVal == "":
		return uint32(sp.TargetPort.IntVal), true
	}
	for _, p := range pods {
		if p.Namespace != s.Namespace || !registry.Selects(s.Spec.Selector, p.Labels) {
			continue
		}
		for _, c := range p.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Name == sp.TargetPort.StrVal {
					return uint32(cp.ContainerPort), true
				}
			}
		}
	}
	return 0, false
}

func ptrValue(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// Config configures a Watcher.
type Config struct {
	Client kubernetes.Interface
	// TrustDomain names the pods' identities.
	TrustDomain spiffeid.TrustDomain
	// OnChange receives the declarations after the first listing and
	// after every change (changes arriving together give one call).
	OnChange func(registry.Declarations)
	Log      *slog.Logger
	// SyncTimeout bounds the first listing (default 30 s).
	SyncTimeout time.Duration
}

// Watch lists and watches pods and services until ctx ends. synced, if
// not nil, is closed once the first declarations have been delivered.
func Watch(ctx context.Context, cfg Config, synced chan<- struct{}) error {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.SyncTimeout == 0 {
		cfg.SyncTimeout = 30 * time.Second
	}
	factory := informers.NewSharedInformerFactory(cfg.Client, 0)
	pods, services := factory.Core().V1().Pods(), factory.Core().V1().Services()
	wake := make(chan struct{}, 1)
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { notify(wake) },
		UpdateFunc: func(any, any) { notify(wake) },
		DeleteFunc: func(any) { notify(wake) },
	}
	for _, inf := range []cache.SharedIndexInformer{pods.Informer(), services.Informer()} {
		if _, err := inf.AddEventHandler(poke); err != nil {
			return fmt.Errorf("workloads: %w", err)
		}
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	syncCtx, cancel := context.WithTimeout(ctx, cfg.SyncTimeout)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), pods.Informer().HasSynced, services.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("workloads: cannot list pods and services after %s: may the control plane list and watch them cluster-wide?", cfg.SyncTimeout)
	}
	deliver := func() {
		ps, err := pods.Lister().List(labels.Everything())
		if err != nil {
			cfg.Log.Error("listing pods failed", "err", err)
			return
		}
		ss, err := services.Lister().List(labels.Everything())
		if err != nil {
			cfg.Log.Error("listing services failed", "err", err)
			return
		}
		cfg.OnChange(Declarations(cfg.TrustDomain, ps, ss, cfg.Log))
	}
	deliver()
	if synced != nil {
		close(synced)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		}
		// A rollout changes many pods at once: one recomputation.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
		deliver()
	}
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
