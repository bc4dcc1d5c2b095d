// Package registry knows the mesh's workloads, services and live instances:
// which workloads are declared (and under which service account), which
// replicas of them have a proxy connected, and therefore which endpoints
// each service port has and which identity each endpoint must prove.
//
// A proxy registers an instance of a declared workload only if the identity
// it proved (its SVID) is that workload's: the namespace and service
// account must match. Labels come from the declaration, never from the
// proxy, so no proxy can place itself behind another workload's service.
package registry

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/statefile"
)

// Declarations are the workloads and services the configuration declares.
type Declarations struct {
	Workloads []Workload
	Services  []Service
}

// Workload is a declared workload.
type Workload struct {
	Namespace      string
	Name           string
	ServiceAccount string
	Labels         map[string]string
	Ports          []WorkloadPort
	// Instances, when not nil, are the only instances that may register
	// (a Kubernetes workload's pods, by name), each at its IP address and
	// with its own service account: during a rollout that changes the
	// service account, old and new pods both serve.
	Instances map[string]DeclaredInstance
}

// DeclaredInstance is a pod a proxy may register as.
type DeclaredInstance struct {
	IP             netip.Addr
	ServiceAccount string
	// Ready is the pod's readiness: its proxy registers as soon as it
	// runs (before the application, by design), but the pod is an
	// endpoint only once the kubelet finds it ready.
	Ready bool
	// Identity is the SPIFFE ID its proxy proves (its service account's).
	Identity string
}

// Ref returns "namespace/name".
func (w Workload) Ref() string { return w.Namespace + "/" + w.Name }

// WorkloadPort is a port a workload listens on; Protocol is a proxy
// protocol name (config.Protocol) or empty.
type WorkloadPort struct {
	Port     uint32
	Protocol string
}

// Service selects workloads of its namespace by labels.
type Service struct {
	Namespace string
	Name      string
	Selector  map[string]string
	Address   string // virtual IP, may be empty
	Ports     []ServicePort
}

// ServicePort maps a service port to the workloads' target port.
type ServicePort struct {
	Name       string
	Port       uint32
	TargetPort uint32
	Protocol   string
}

// Instance is one registered replica of a workload, served by one proxy.
type Instance struct {
	Namespace string `json:"namespace"`
	Workload  string `json:"workload"`
	Instance  string `json:"instance"`
	// Identity is the SPIFFE ID the proxy proved.
	Identity string `json:"identity"`
	// Ports maps each workload port to the ip:port mesh peers reach it at.
	Ports map[uint32]string `json:"ports"`
	// Stats is where its proxy serves metrics (ip:port), "" for nowhere.
	Stats string `json:"stats,omitempty"`
	// DisconnectedAt is zero while the proxy is connected.
	DisconnectedAt time.Time `json:"disconnectedAt,omitzero"`
	RegisteredAt   time.Time `json:"registeredAt"`
}

// Key identifies an instance: namespace/workload/instance.
func (i Instance) Key() string { return i.Namespace + "/" + i.Workload + "/" + i.Instance }

// ErrNotAllowed is returned when a proxy claims a workload its identity
// does not match.
var ErrNotAllowed = errors.New("not allowed")

// Config configures a Registry.
type Config struct {
	Declarations Declarations
	// GracePeriod keeps a disconnected instance's endpoints in service.
	GracePeriod time.Duration
	// RestoreGrace is the grace period of instances restored from
	// StateFile, if longer than GracePeriod: proxies that lost the control
	// plane retry with a backoff that may well exceed GracePeriod.
	RestoreGrace time.Duration
	// StateFile persists instances across restarts; empty: not persisted.
	StateFile string
	// Pending says the declarations arrive later (SetDeclarations, from a
	// cluster): restored instances are kept until then, and the first
	// declarations decide which stay.
	Pending bool
	// OnChange is called (without locks held) after endpoints may have
	// changed.
	OnChange func()
	Now      func() time.Time
	Log      *slog.Logger
}

// Registry is safe for concurrent use.
type Registry struct {
	cfg       Config
	mu        sync.Mutex
	workloads map[string]Workload // by namespace/name
	instances map[string]*entry
	byAddr    map[string]string // port address → instance key
	session   uint64
	dirty     bool // instances changed since the last save
}

type entry struct {
	Instance
	session  uint64 // the stream that owns it; 0 when restored from disk
	restored bool   // from disk and not reconnected since
}

// New builds a registry, restoring the instances saved in StateFile as
// disconnected now, so they stay in service for the grace period while
// their proxies reconnect.
func New(cfg Config) (*Registry, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.OnChange == nil {
		cfg.OnChange = func() {}
	}
	r := &Registry{cfg: cfg, workloads: map[string]Workload{}, instances: map[string]*entry{}, byAddr: map[string]string{}}
	for _, w := range cfg.Declarations.Workloads {
		r.workloads[w.Ref()] = w
	}
	if cfg.StateFile == "" {
		return r, nil
	}
	data, err := os.ReadFile(cfg.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	var saved []Instance
	if err := json.Unmarshal(data, &saved); err != nil {
		return nil, fmt.Errorf("registry: %s is corrupt (%v): move it away to start with no registrations", cfg.StateFile, err)
	}
	now := cfg.Now()
	for _, in := range saved {
		if !cfg.Pending {
			w, ok := r.workloads[in.Namespace+"/"+in.Workload]
			if !ok {
				continue // no longer declared
			}
			if id, err := spiffeid.FromString(in.Identity); err != nil {
				continue
			} else if _, err := r.Claim(id, w.Name); err != nil {
				continue // the declaration changed its service account
			}
		}
		// The grace period starts over, and lasts long enough for
		// proxies to come back: while the control plane was down none
		// could reconnect.
		in.DisconnectedAt = now
		r.addLocked(&entry{Instance: in, restored: true})
	}
	return r, nil
}

// Claim checks that the holder of id may serve workload name, and returns
// its declaration.
func (r *Registry) Claim(id spiffeid.ID, name string) (Workload, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.claimLocked(id, name)
}

func (r *Registry) claimLocked(id spiffeid.ID, name string) (Workload, error) {
	ns, sa, err := meshid.Parse(id)
	if err != nil {
		return Workload{}, fmt.Errorf("%w: %v", ErrNotAllowed, err)
	}
	w, ok := r.workloads[ns+"/"+name]
	if !ok {
		return Workload{}, fmt.Errorf("%w: no workload %s/%s is declared (a proxy registers as a workload of its own namespace %s)", ErrNotAllowed, ns, name, ns)
	}
	if w.ServiceAccount != sa && !slices.ContainsFunc(slices.Collect(maps.Values(w.Instances)), func(d DeclaredInstance) bool { return d.ServiceAccount == sa }) {
		return Workload{}, fmt.Errorf("%w: identity %s may not serve workload %s, which runs as service account %s", ErrNotAllowed, id, w.Ref(), w.ServiceAccount)
	}
	return w, nil
}

// ErrAddressInUse is returned when an instance claims an address another
// connected instance serves: one address is one instance, with one
// identity, or no caller could check whom it reaches.
var ErrAddressInUse = errors.New("address in use")

// Register records a connected instance and returns the session that owns
// it; a later registration of the same instance (a reconnect) takes it
// over. An address held by another instance is refused while that
// instance is connected; an instance in its grace period gives it up (its
// address was reused).
func (r *Registry) Register(in Instance) (session uint64, err error) {
	r.mu.Lock()
	// Checked again under the lock: the declarations may have changed
	// since the stream's Claim.
	if err := r.recheckLocked(in); err != nil {
		r.mu.Unlock()
		return 0, err
	}
	evicted := false
	for port, addr := range in.Ports {
		k, ok := r.byAddr[addr]
		if !ok || k == in.Key() {
			continue
		}
		e := r.instances[k]
		if e.DisconnectedAt.IsZero() {
			r.mu.Unlock()
			return 0, fmt.Errorf("%w: port %d's address %s is served by instance %s (%s); each instance needs its own address", ErrAddressInUse, port, addr, k, e.Identity)
		}
		r.removeLocked(k)
		evicted = true
		r.cfg.Log.Info("instance removed: a new instance took over its address", "instance", k, "address", addr, "by", in.Key())
	}
	r.session++
	session = r.session
	in.DisconnectedAt = time.Time{}
	in.RegisteredAt = r.cfg.Now()
	prev := r.instances[in.Key()]
	if prev != nil {
		r.removeLocked(in.Key())
	}
	r.addLocked(&entry{Instance: in, session: session})
	changed := evicted || prev == nil || !prev.DisconnectedAt.IsZero() || !maps.Equal(prev.Ports, in.Ports) || prev.Identity != in.Identity
	r.dirty = true
	r.mu.Unlock()
	if changed {
		r.cfg.OnChange()
	}
	return session, nil
}

// Holds reports whether the instance is registered under session: false
// once another connection took it over, or the declarations removed it.
func (r *Registry) Holds(key string, session uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.instances[key]
	return ok && e.session == session
}

// recheckLocked checks an instance's identity against its workload's
// declaration (Claim) and against its declared instance, if any.
func (r *Registry) recheckLocked(in Instance) error {
	id, err := spiffeid.FromString(in.Identity)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotAllowed, err)
	}
	if _, err := r.claimLocked(id, in.Workload); err != nil {
		return err
	}
	return r.admitLocked(in)
}

// admitLocked checks an instance against its workload's declared
// instances, if the declaration lists them.
func (r *Registry) admitLocked(in Instance) error {
	w, ok := r.workloads[in.Namespace+"/"+in.Workload]
	if !ok {
		return fmt.Errorf("%w: no workload %s/%s is declared", ErrNotAllowed, in.Namespace, in.Workload)
	}
	if w.Instances == nil {
		return nil
	}
	d, ok := w.Instances[in.Instance]
	if !ok {
		return fmt.Errorf("%w: workload %s has no instance (pod) %s with an address: register as your own pod (--instance $(POD_NAME))", ErrNotAllowed, w.Ref(), in.Instance)
	}
	id, err := spiffeid.FromString(in.Identity)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotAllowed, err)
	}
	if _, sa, err := meshid.Parse(id); err != nil || sa != d.ServiceAccount {
		return fmt.Errorf("%w: identity %s may not serve instance %s, which runs as service account %s", ErrNotAllowed, id, in.Instance, d.ServiceAccount)
	}
	for port, addr := range in.Ports {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil || ap.Addr().Unmap() != d.IP {
			return fmt.Errorf("%w: port %d's address %s is not instance %s's address %s", ErrNotAllowed, port, addr, in.Instance, d.IP)
		}
	}
	return nil
}

// SetDeclarations replaces the declared workloads and services (a
// Kubernetes cluster's change as pods and services come and go). Instances
// the new declarations no longer allow — their workload or pod is gone,
// its service account or address changed — are removed at once, without
// grace period: their pod no longer exists.
func (r *Registry) SetDeclarations(d Declarations) {
	r.mu.Lock()
	r.cfg.Declarations = d
	r.workloads = make(map[string]Workload, len(d.Workloads))
	for _, w := range d.Workloads {
		r.workloads[w.Ref()] = w
	}
	for key, e := range r.instances {
		if err := r.recheckLocked(e.Instance); err != nil {
			r.removeLocked(key)
			r.dirty = true
			r.cfg.Log.Info("instance removed: the declarations no longer allow it", "instance", key, "why", err)
		}
	}
	r.mu.Unlock()
	r.cfg.OnChange()
}

// Disconnect marks the session's instance disconnected; graceful removes
// it at once (the proxy said goodbye). A session that was taken over by a
// newer registration changes nothing.
func (r *Registry) Disconnect(key string, session uint64, graceful bool) {
	r.mu.Lock()
	e, ok := r.instances[key]
	if !ok || e.session != session {
		r.mu.Unlock()
		return
	}
	if graceful || r.cfg.GracePeriod == 0 {
		r.removeLocked(key)
	} else {
		e.DisconnectedAt = r.cfg.Now()
	}
	r.dirty = true
	r.mu.Unlock()
	if graceful || r.cfg.GracePeriod == 0 {
		r.cfg.OnChange()
	}
}

// Expire removes instances disconnected for longer than the grace period
// and reports how many.
func (r *Registry) Expire() int {
	now := r.cfg.Now()
	r.mu.Lock()
	n := 0
	for k, e := range r.instances {
		grace := r.cfg.GracePeriod
		if e.restored {
			grace = max(grace, r.cfg.RestoreGrace)
		}
		if !e.DisconnectedAt.IsZero() && now.Sub(e.DisconnectedAt) >= grace {
			r.removeLocked(k)
			r.cfg.Log.Info("instance removed: its proxy did not come back within the grace period", "instance", k, "grace", grace)
			n++
		}
	}
	if n > 0 {
		r.dirty = true
	}
	r.mu.Unlock()
	if n > 0 {
		r.cfg.OnChange()
	}
	return n
}

func (r *Registry) addLocked(e *entry) {
	r.instances[e.Key()] = e
	for _, addr := range e.Ports {
		r.byAddr[addr] = e.Key()
	}
}

func (r *Registry) removeLocked(key string) {
	e, ok := r.instances[key]
	if !ok {
		return
	}
	delete(r.instances, key)
	for _, addr := range e.Ports {
		if r.byAddr[addr] == key {
			delete(r.byAddr, addr)
		}
	}
}

// Save writes the instances to the state file if they changed.
func (r *Registry) Save() error {
	if r.cfg.StateFile == "" {
		return nil
	}
	r.mu.Lock()
	if !r.dirty {
		r.mu.Unlock()
		return nil
	}
	list := r.instancesLocked()
	r.dirty = false
	r.mu.Unlock()
	data, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if err := statefile.WriteAtomic(r.cfg.StateFile, data, 0o600); err != nil {
		r.mu.Lock()
		r.dirty = true
		r.mu.Unlock()
		return fmt.Errorf("registry: save: %w", err)
	}
	return nil
}

func (r *Registry) instancesLocked() []Instance {
	list := make([]Instance, 0, len(r.instances))
	for _, e := range r.instances {
		list = append(list, e.Instance)
	}
	slices.SortFunc(list, func(a, b Instance) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Workload, b.Workload), cmp.Compare(a.Instance, b.Instance))
	})
	return list
}

// Snapshot is a consistent copy of the registry, for computing endpoints.
type Snapshot struct {
	Declarations Declarations
	// Instances are every registered instance, connected or within the
	// grace period, sorted by key.
	Instances []Instance
}

// Snapshot returns the registry's current state.
func (r *Registry) Snapshot() Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Snapshot{Declarations: r.cfg.Declarations, Instances: r.instancesLocked()}
}

// Destination is one service port with its endpoints.
type Destination struct {
	Service   string // name.namespace
	Port      uint32
	Protocol  string
	Addresses []string // virtual ip:port, empty when the service has no address
	Endpoints []Endpoint
}

// Endpoint is an instance's address for the port and the identity it must
// prove.
type Endpoint struct {
	Address  string
	Identity string
}

// Destinations computes every service port's endpoints, in a stable order:
// the instances of the workloads the service selects (in its namespace)
// that serve the target port.
func (s Snapshot) Destinations() []Destination {
	byWorkload := map[string][]Instance{}
	for _, in := range s.Instances {
		k := in.Namespace + "/" + in.Workload
		byWorkload[k] = append(byWorkload[k], in)
	}
	var out []Destination
	for _, svc := range s.Declarations.Services {
		var selected []Workload
		for _, w := range s.Declarations.Workloads {
			if w.Namespace == svc.Namespace && Selects(svc.Selector, w.Labels) {
				selected = append(selected, w)
			}
		}
		for _, sp := range svc.Ports {
			d := Destination{Service: svc.Name + "." + svc.Namespace, Port: sp.Port, Protocol: sp.Protocol}
			if svc.Address != "" {
				d.Addresses = []string{net.JoinHostPort(svc.Address, strconv.Itoa(int(sp.Port)))}
			}
			for _, w := range selected {
				if d.Protocol == "" {
					for _, wp := range w.Ports {
						if wp.Port == sp.TargetPort {
							d.Protocol = wp.Protocol
						}
					}
				}
				// A cluster's pods are endpoints once ready, whichever
				// control plane replica their proxies are connected to (or
				// none, while it restarts): at their IP and the target
				// port, with their service account's identity.
				if w.Instances != nil {
					for _, name := range slices.Sorted(maps.Keys(w.Instances)) {
						if di := w.Instances[name]; di.Ready && di.Identity != "" {
							d.Endpoints = append(d.Endpoints, Endpoint{Address: net.JoinHostPort(di.IP.String(), strconv.Itoa(int(sp.TargetPort))), Identity: di.Identity})
						}
					}
					continue
				}
				for _, in := range byWorkload[w.Ref()] {
					if addr, ok := in.Ports[sp.TargetPort]; ok {
						d.Endpoints = append(d.Endpoints, Endpoint{Address: addr, Identity: in.Identity})
					}
				}
			}
			slices.SortStableFunc(d.Endpoints, func(a, b Endpoint) int { return cmp.Compare(a.Address, b.Address) })
			d.Endpoints = slices.CompactFunc(d.Endpoints, func(a, b Endpoint) bool { return a.Address == b.Address })
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b Destination) int {
		return cmp.Or(cmp.Compare(a.Service, b.Service), cmp.Compare(a.Port, b.Port))
	})
	return out
}

// Selects reports whether a service's selector matches labels. Unlike a
// policy's, an empty selector selects nothing, as in Kubernetes.
func Selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}
