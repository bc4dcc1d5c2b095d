// Package push is the control plane's discovery service: it holds one
// gRPC stream per proxy, registers the workload instance the proxy serves,
// and sends each proxy the configuration that concerns it — the policies
// that may apply to its workload and the destinations it may call — as
// versioned updates that the proxy acknowledges.
//
// The pieces follow the watcher → translator → stream shape: the registry
// and the resource watcher report changes; a single loop coalesces them and
// translates the state into one view per workload (not per proxy); each
// stream sends its proxy the latest view of its workload when the view's
// version differs from what the proxy has.
package push

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/policypb"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Defaults.
const (
	// DefaultCoalesce is how long a change waits for more changes before
	// views are recomputed, so a burst of file writes is one push.
	DefaultCoalesce = 100 * time.Millisecond
	// maxCoalesce bounds the wait under a continuous stream of changes.
	maxCoalesce = time.Second
	// helloTimeout bounds how long a new stream may take to say who it is.
	helloTimeout = 10 * time.Second
)

// Config configures a Server.
type Config struct {
	Registry *registry.Registry
	// Verify re-checks a peer's certificate chain against the trust
	// bundle in force and returns its SPIFFE ID; see Authenticate.
	Verify   Verifier
	Coalesce time.Duration
	Log      *slog.Logger
	Now      func() time.Time
	// Pushes, when set, counts the updates sent.
	Pushes func()
	// RegistryOnly refuses destinations outside the registry (mesh
	// services and ServiceEntry hosts) instead of passing them through.
	RegistryOnly bool
	// ExternalRange, when valid, gives ServiceEntry hosts virtual IPs
	// (ExternalAddresses) that sidecars route by.
	ExternalRange netip.Prefix
	// Encoded says the gRPC server runs with Codec, so updates are
	// encoded once per view rather than once per stream.
	Encoded bool
	// Hold keeps streams waiting until Release as well as the first views:
	// a control plane whose sources (a cluster's pods and resources) are
	// not listed yet would otherwise send proxies views without their
	// policies — allow-all, PERMISSIVE.
	Hold bool
}

// Server implements discoveryv1.DiscoveryServer.
type Server struct {
	discoveryv1.UnimplementedDiscoveryServer
	cfg Config

	policies atomic.Pointer[policy.Set]
	trigger  chan struct{}
	// ready is closed once the first views are computed; streams wait for
	// it so that no proxy is sent an empty configuration at startup.
	ready     chan struct{}
	readyOnce sync.Once
	released  atomic.Bool
	// stopping ends every stream, so the gRPC server can stop gracefully.
	stopping chan struct{}
	stopOnce sync.Once

	// recomputing serializes recomputations, so a Sync and the loop cannot
	// install views out of order.
	recomputing sync.Mutex
	mu          sync.Mutex
	views       map[string]*view // by workload namespace/name
	streams     map[*stream]struct{}
	owners      map[string]*stream // the stream that owns each instance
	generation  uint64             // counts recomputations that changed a view
	computedAt  time.Time
	// tap holds the proxies' tap streams and the users' taps.
	tap taps
}

// view is the configuration of every proxy of one workload. It is never
// modified once published.
type view struct {
	update  *discoveryv1.Update
	version string
	wire    *encoded   // update, encoded once for every stream
	dests   *destTable // the destinations in update

	// deltas caches the incremental updates from the destinations a
	// stream has to these: during a push, every stream of the view
	// usually has the same ones, and each delta is built once.
	deltasMu sync.Mutex
	deltas   map[*destTable]*delta
}

// destTable is one recomputation's destinations with a digest of each,
// immutable once built, so streams can say which one they were sent.
type destTable struct {
	byKey map[destKey]*discoveryv1.Destination
	hash  map[destKey]string
}

type destKey struct {
	service string
	port    uint32
}

func newDestTable(ds []*discoveryv1.Destination) *destTable {
	t := &destTable{byKey: make(map[destKey]*discoveryv1.Destination, len(ds)), hash: make(map[destKey]string, len(ds))}
	for _, d := range ds {
		k := destKey{d.GetService(), d.GetPort()}
		t.byKey[k] = d
		t.hash[k] = hashMessage(d)
	}
	return t
}

// delta is an incremental update, as a message and encoded.
type delta struct {
	update *discoveryv1.Update
	wire   *encoded
}

// maxDeltas bounds a view's cache of deltas.
const maxDeltas = 8

// deltaFrom returns the incremental update that brings a proxy holding the
// destinations from to this view.
func (v *view) deltaFrom(from *destTable) *delta {
	v.deltasMu.Lock()
	defer v.deltasMu.Unlock()
	if d, ok := v.deltas[from]; ok {
		return d
	}
	u := &discoveryv1.Update{
		Version: v.update.GetVersion(), Workload: v.update.GetWorkload(),
		PeerAuthentications: v.update.GetPeerAuthentications(), AuthorizationPolicies: v.update.GetAuthorizationPolicies(),
		RegistryOnly: v.update.GetRegistryOnly(), GatewayRoutes: v.update.GetGatewayRoutes(), Incremental: true,
	}
	for _, d := range v.update.GetDestinations() {
		k := destKey{d.GetService(), d.GetPort()}
		if from.hash[k] != v.dests.hash[k] {
			u.Destinations = append(u.Destinations, d)
		}
	}
	for k := range from.byKey {
		if _, ok := v.dests.byKey[k]; !ok {
			u.RemovedDestinations = append(u.RemovedDestinations, &discoveryv1.DestinationKey{Service: k.service, Port: k.port})
		}
	}
	slices.SortFunc(u.RemovedDestinations, func(a, b *discoveryv1.DestinationKey) int {
		return cmp.Or(cmp.Compare(a.GetService(), b.GetService()), cmp.Compare(a.GetPort(), b.GetPort()))
	})
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(u)
	if err != nil {
		panic(err) // generated messages always marshal
	}
	d := &delta{update: u, wire: &encoded{b: b}}
	if v.deltas == nil || len(v.deltas) >= maxDeltas {
		v.deltas = map[*destTable]*delta{}
	}
	v.deltas[from] = d
	return d
}

// New returns a Server; Run must be running for it to send anything.
func New(cfg Config) *Server {
	if cfg.Coalesce == 0 {
		cfg.Coalesce = DefaultCoalesce
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Pushes == nil {
		cfg.Pushes = func() {}
	}
	s := &Server{
		cfg:      cfg,
		trigger:  make(chan struct{}, 1),
		ready:    make(chan struct{}),
		stopping: make(chan struct{}),
		views:    map[string]*view{},
		streams:  map[*stream]struct{}{},
		owners:   map[string]*stream{},
	}
	s.policies.Store(&policy.Set{})
	s.released.Store(!cfg.Hold)
	return s
}

// SetPolicies replaces the policies in force and schedules a push.
func (s *Server) SetPolicies(set *policy.Set) {
	s.policies.Store(set)
	s.Changed()
}

// Shutdown ends every stream (proxies keep their configuration and
// reconnect with backoff) and refuses new ones.
func (s *Server) Shutdown() {
	s.stopOnce.Do(func() { close(s.stopping) })
}

// Changed schedules a recomputation; calls coalesce.
func (s *Server) Changed() {
	select {
	case s.trigger <- struct{}{}:
	default:
	}
}

// evict ends the streams whose instance the registry no longer holds
// under their session (removed with its pod): their proxies reconnect,
// and are refused while the pod is gone.
func (s *Server) evict() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for st := range s.streams {
		if s.owners[st.key] != st {
			continue // taken over: its replaced channel says so
		}
		if !st.evictedClosed && !s.cfg.Registry.Holds(st.key, st.session) {
			st.evictedClosed = true
			close(st.evicted)
		}
	}
}

// Run recomputes views after changes until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	s.recompute()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.trigger:
		}
		// Coalesce: wait until changes stop for Coalesce, at most
		// maxCoalesce after the first.
		deadline := time.NewTimer(maxCoalesce)
	wait:
		for {
			quiet := time.NewTimer(s.cfg.Coalesce)
			select {
			case <-ctx.Done():
				quiet.Stop()
				deadline.Stop()
				return nil
			case <-s.trigger:
				quiet.Stop()
			case <-quiet.C:
				break wait
			case <-deadline.C:
				quiet.Stop()
				break wait
			}
		}
		deadline.Stop()
		s.recompute()
	}
}

// Sync recomputes the views now, without waiting for the coalescing
// delay, so that what Status reports next reflects every change made
// before the call.
func (s *Server) Sync() { s.recompute() }

// recompute translates the current state into one view per declared
// workload and wakes the streams whose view changed.
func (s *Server) recompute() {
	s.recomputing.Lock()
	defer s.recomputing.Unlock()
	snap := s.cfg.Registry.Snapshot()
	s.evict()
	set := s.policies.Load()
	dests := append(destinations(snap.Destinations()), externalDestinations(set, ExternalAddresses(set, s.cfg.ExternalRange))...)
	table := newDestTable(dests)
	pas, aps := policypb.FromSet(set)
	// The destinations are the same for every workload: hash them once
	// and combine with each workload's own part.
	destHash := hashMessage(&discoveryv1.Update{Destinations: dests})

	views := make(map[string]*view, len(snap.Declarations.Workloads))
	for _, w := range snap.Declarations.Workloads {
		u := &discoveryv1.Update{
			Workload:     &discoveryv1.Workload{Namespace: w.Namespace, Name: w.Name, ServiceAccount: w.ServiceAccount, Labels: w.Labels},
			RegistryOnly: s.cfg.RegistryOnly,
		}
		for _, pa := range pas {
			if applies(pa.GetMetadata(), pa.GetSelector(), w) {
				u.PeerAuthentications = append(u.PeerAuthentications, pa)
			}
		}
		for _, ap := range aps {
			if applies(ap.GetMetadata(), ap.GetSelector(), w) {
				u.AuthorizationPolicies = append(u.AuthorizationPolicies, ap)
			}
		}
		u.GatewayRoutes = gatewayRoutes(set, w.Ref())
		own := hashMessage(u)
		sum := sha256.Sum256([]byte(own + destHash))
		u.Version = hex.EncodeToString(sum[:8])
		u.Destinations = dests
		views[w.Ref()] = &view{update: u, version: u.Version, dests: table}
	}

	s.mu.Lock()
	prev := s.views
	s.mu.Unlock()
	changed := false
	for k, v := range views {
		if old, ok := prev[k]; ok && old.version == v.version {
			views[k] = old
			continue
		}
		changed = true
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(v.update)
		if err != nil {
			panic(err) // generated messages always marshal
		}
		v.wire = &encoded{b: b}
	}
	s.mu.Lock()
	if changed || len(views) != len(s.views) {
		s.generation++
	}
	s.views = views
	s.computedAt = s.cfg.Now()
	var wake []*stream
	for st := range s.streams {
		if v := views[st.workload.Ref()]; v != nil && v.version != st.sentVersion() {
			wake = append(wake, st)
		}
	}
	s.mu.Unlock()
	for _, st := range wake {
		st.wake()
	}
	if s.released.Load() {
		s.readyOnce.Do(func() { close(s.ready) })
	}
	s.cfg.Log.Debug("views computed", "workloads", len(views), "woken", len(wake))
}

// Release lets streams proceed once the sources Hold waited for are in.
func (s *Server) Release() {
	s.released.Store(true)
	s.Changed()
}

// applies reports whether a policy of the given metadata and selector may
// apply to w: it is in w's namespace or the root namespace, and its
// selector (if any) matches w's labels.
func applies(m *discoveryv1.Metadata, sel *discoveryv1.Selector, w registry.Workload) bool {
	if ns := m.GetNamespace(); ns != w.Namespace && ns != meshid.RootNamespace {
		return false
	}
	return (&policy.Selector{MatchLabels: sel.GetMatchLabels()}).Matches(w.Labels)
}

func destinations(ds []registry.Destination) []*discoveryv1.Destination {
	out := make([]*discoveryv1.Destination, 0, len(ds))
	for _, d := range ds {
		pd := &discoveryv1.Destination{Service: d.Service, Port: d.Port, Protocol: d.Protocol, Addresses: d.Addresses}
		for _, e := range d.Endpoints {
			pd.Endpoints = append(pd.Endpoints, &discoveryv1.Endpoint{Address: e.Address, Identity: e.Identity})
		}
		out = append(out, pd)
	}
	return out
}

// hashMessage returns a short stable digest of m's deterministic encoding.
func hashMessage(m proto.Message) string {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err) // generated messages always marshal
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// viewOf returns the current view of a workload.
func (s *Server) viewOf(ref string) *view {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.views[ref]
}

// Generation counts the recomputations that changed some workload's view.
func (s *Server) Generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.generation
}
