package push

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Verifier checks a peer's certificate chain against the trust bundle in
// force now and returns the SPIFFE ID it proves.
type Verifier func(chain []*x509.Certificate) (spiffeid.ID, error)

var errStopping = status.Error(codes.Unavailable, "the control plane is shutting down; keep the current configuration and reconnect")

const (
	// reverifyEvery is how often a stream's client certificate is checked
	// against the bundle in force.
	reverifyEvery = time.Minute
	// maxReason bounds the NACK reason kept and logged.
	maxReason = 1024
)

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// stream is one connected proxy.
type stream struct {
	key      string // namespace/workload/instance
	session  uint64 // the registry session the stream owns
	replaced chan struct{}
	// evicted is closed when the registry no longer holds the stream's
	// instance (its pod was deleted); evictedClosed guards it, under the
	// server's mu.
	evicted       chan struct{}
	evictedClosed bool
	// ended is closed when the stream's handler returns: the proxy's tap
	// stream ends with it.
	ended chan struct{}
	// sentDests are the destinations the proxy was last sent; nil until
	// the first update, and after a NACK. Only the stream's own goroutine
	// uses it.
	sentDests       *destTable
	sentIncremental bool // the last update sent was incremental
	workload        registry.Workload
	instance        string
	identity        spiffeid.ID
	peer            string
	connectedAt     time.Time
	notify          chan struct{}

	mu         sync.Mutex
	sent       string // version last sent (or announced by the proxy)
	acked      string
	nack       string // reason of the last NACK, cleared by an ACK
	nackFor    string // version the NACK was for
	lastSeen   time.Time
	certExpiry time.Time
	certIssued time.Time // the certificate's NotBefore
}

func (st *stream) wake() {
	select {
	case st.notify <- struct{}{}:
	default:
	}
}

func (st *stream) sentVersion() string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.sent
}

// Stream implements discoveryv1.DiscoveryServer.
func (s *Server) Stream(ss discoveryv1.Discovery_StreamServer) error {
	ctx := ss.Context()
	select {
	case <-s.stopping:
		return errStopping
	default:
	}
	chain, peerAddr, err := peerChain(ctx)
	if err != nil {
		return err
	}
	id, err := s.cfg.Verify(chain)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "the client certificate is not a valid SVID of this mesh: %v", err)
	}
	certExpiry, certIssued := chain[0].NotAfter, chain[0].NotBefore

	// Reads happen on their own goroutine so the loop below can wait on
	// updates and messages at once.
	msgs := make(chan *discoveryv1.ProxyMessage)
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := ss.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return
			}
		}
	}()

	var hello *discoveryv1.Hello
	select {
	case m := <-msgs:
		if hello = m.GetHello(); hello == nil {
			return status.Error(codes.InvalidArgument, "the first message of a stream must be a Hello")
		}
	case err := <-recvErr:
		return err
	case <-time.After(helloTimeout):
		return status.Error(codes.DeadlineExceeded, "no Hello received")
	case <-ctx.Done():
		return ctx.Err()
	}
	// The registry and views first: a claim checked before the sources
	// are listed would be refused for want of a declaration.
	select {
	case <-s.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	w, ports, err := s.claim(id, hello, peerAddr)
	if err != nil {
		s.cfg.Log.Warn("proxy registration refused", "id", id, "peer", peerAddr, "workload", hello.GetWorkload(), "err", err)
		if errors.Is(err, registry.ErrNotAllowed) {
			return status.Error(codes.PermissionDenied, err.Error())
		}
		return status.Error(codes.InvalidArgument, err.Error())
	}

	now := s.cfg.Now()
	st := &stream{
		workload: w, instance: hello.GetInstance(), identity: id, peer: peerAddr,
		connectedAt: now, lastSeen: now, notify: make(chan struct{}, 1), replaced: make(chan struct{}), evicted: make(chan struct{}), ended: make(chan struct{}), certExpiry: certExpiry, certIssued: certIssued,
	}
	// A proxy that already runs the current version (a reconnect after a
	// control plane restart) is not sent it again.
	if v := s.viewOf(w.Ref()); v != nil && hello.GetVersion() == v.version {
		st.sent, st.acked, st.sentDests = v.version, v.version, v.dests
	}
	in := registry.Instance{Namespace: w.Namespace, Workload: w.Name, Instance: st.instance, Identity: id.String(), Ports: ports, Stats: hello.GetStatsAddress()}
	session, err := s.cfg.Registry.Register(in)
	if err != nil {
		s.cfg.Log.Warn("proxy registration refused", "id", id, "peer", peerAddr, "instance", in.Key(), "err", err)
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	st.key, st.session = in.Key(), session
	s.mu.Lock()
	// A newer connection of the same instance (a reconnect the old
	// connection has not noticed, or two replicas given one name) takes
	// over: the older stream ends, so one proxy owns the registration.
	if old := s.owners[st.key]; old != nil {
		close(old.replaced)
	}
	s.owners[st.key] = st
	s.streams[st] = struct{}{}
	// The declarations may have dropped the instance between Register and
	// now, and that recompute's evict did not see this stream.
	if !s.cfg.Registry.Holds(st.key, st.session) {
		st.evictedClosed = true
		close(st.evicted)
	}
	s.mu.Unlock()
	s.cfg.Log.Info("proxy connected", "instance", in.Key(), "id", id, "peer", peerAddr)
	graceful := false
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		if s.owners[st.key] == st {
			delete(s.owners, st.key)
		}
		s.mu.Unlock()
		close(st.ended)
		s.cfg.Registry.Disconnect(in.Key(), session, graceful)
		s.cfg.Log.Info("proxy disconnected", "instance", in.Key(), "graceful", graceful)
	}()

	// The connection was authenticated with a certificate that will
	// expire; the proxy must come back with its renewed one.
	expiry := time.NewTimer(time.Until(certExpiry))
	defer expiry.Stop()
	// The bundle can change under a long stream (a root retired): the
	// chain is verified again from time to time.
	reverify := time.NewTicker(reverifyEvery)
	defer reverify.Stop()
	st.wake()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.stopping:
			return errStopping
		case <-st.replaced:
			return status.Errorf(codes.Aborted, "instance %s connected again from another connection, which takes over; if two replicas share this instance name, give each its own --instance", in.Key())
		case <-st.evicted:
			return status.Errorf(codes.PermissionDenied, "instance %s is no longer registered: its pod or workload is gone, or its service account changed", in.Key())
		case <-expiry.C:
			return status.Error(codes.Unauthenticated, "the certificate this stream was opened with has expired; reconnect with the renewed one")
		case <-reverify.C:
			if _, err := s.cfg.Verify(chain); err != nil {
				return status.Errorf(codes.Unauthenticated, "the certificate this stream was opened with no longer verifies: %v", err)
			}
		case err := <-recvErr:
			return err
		case <-st.notify:
			v := s.viewOf(w.Ref())
			if v == nil || v.version == st.sentVersion() {
				continue
			}
			if err := s.send(ss, st, v); err != nil {
				return err
			}
			s.cfg.Pushes()
			st.mu.Lock()
			st.sent = v.version
			st.mu.Unlock()
			// The view may have changed while Send blocked — even back to
			// what was sent before, which recompute would not have
			// noticed as a difference.
			if cur := s.viewOf(w.Ref()); cur != nil && cur.version != v.version {
				st.wake()
			}
		case m := <-msgs:
			now := s.cfg.Now()
			resync := false
			st.mu.Lock()
			st.lastSeen = now
			switch {
			case m.GetAck() != nil:
				a := m.GetAck()
				if a.GetError() == "" {
					st.acked, st.nack, st.nackFor = a.GetVersion(), "", ""
				} else {
					st.nack, st.nackFor = truncate(a.GetError(), maxReason), truncate(a.GetVersion(), 64)
					// It kept what it had before, which incremental
					// updates can no longer be built on: the next is whole,
					// and if an incremental one was refused, it comes now
					// (a whole one refused is not retried until the view
					// changes).
					st.sentDests = nil
					if st.sentIncremental {
						st.sent = ""
						resync = true
					}
				}
			}
			st.mu.Unlock()
			if resync {
				st.wake()
			}
			if a := m.GetAck(); a != nil && a.GetError() != "" {
				s.cfg.Log.Warn("proxy rejected a configuration", "instance", in.Key(), "version", truncate(a.GetVersion(), 64), "reason", truncate(a.GetError(), maxReason))
			}
			if m.GetGoodbye() != nil {
				graceful = true
				return nil
			}
		}
	}
}

// send writes a view's update to the stream: whole the first time (or
// after a NACK), afterwards only the destinations that changed since the
// ones the stream was last sent. Bytes encoded once are sent when the
// server runs with Codec, messages otherwise.
func (s *Server) send(ss discoveryv1.Discovery_StreamServer, st *stream, v *view) error {
	var err error
	st.sentIncremental = st.sentDests != nil
	switch {
	case st.sentDests == nil && s.cfg.Encoded:
		err = ss.SendMsg(v.wire)
	case st.sentDests == nil:
		err = ss.Send(v.update)
	case s.cfg.Encoded:
		err = ss.SendMsg(v.deltaFrom(st.sentDests).wire)
	default:
		err = ss.Send(v.deltaFrom(st.sentDests).update)
	}
	if err == nil {
		st.sentDests = v.dests
	}
	return err
}

// claim checks the Hello against the proxy's identity and the declared
// workload, and returns the workload and its port addresses.
func (s *Server) claim(id spiffeid.ID, h *discoveryv1.Hello, peerAddr string) (registry.Workload, map[uint32]string, error) {
	w, err := s.cfg.Registry.Claim(id, h.GetWorkload())
	if err != nil {
		return w, nil, err
	}
	if err := meshid.ValidateName("instance", h.GetInstance()); err != nil {
		return w, nil, fmt.Errorf("hello.instance: %v", err)
	}
	// A pod's proxy connects from its pod's address: another pod of the
	// same service account cannot register as this one.
	if d, ok := w.Instances[h.GetInstance()]; ok {
		if peer, err := netip.ParseAddrPort(peerAddr); err != nil || peer.Addr().Unmap() != d.IP {
			return w, nil, fmt.Errorf("%w: instance %s is the pod at %s, and this proxy connects from %s", registry.ErrNotAllowed, h.GetInstance(), d.IP, peerAddr)
		}
	}
	declared := map[uint32]bool{}
	for _, p := range w.Ports {
		declared[p.Port] = true
	}
	ports := map[uint32]string{}
	for i, p := range h.GetPorts() {
		if !declared[p.GetPort()] {
			return w, nil, fmt.Errorf("hello.ports[%d]: workload %s declares no port %d", i, w.Ref(), p.GetPort())
		}
		ap, err := netip.ParseAddrPort(p.GetAddress())
		if err != nil || ap.Port() == 0 {
			return w, nil, fmt.Errorf("hello.ports[%d].address: %q is not ip:port", i, p.GetAddress())
		}
		if a := ap.Addr(); a.IsUnspecified() || a.IsMulticast() {
			return w, nil, fmt.Errorf("hello.ports[%d].address: %s is not an address peers can connect to (give the proxy --advertise-ip)", i, a)
		}
		ports[p.GetPort()] = p.GetAddress()
	}
	if a := h.GetStatsAddress(); a != "" {
		ap, err := netip.ParseAddrPort(a)
		if err != nil || ap.Port() == 0 || ap.Addr().IsUnspecified() || ap.Addr().IsMulticast() {
			return w, nil, fmt.Errorf("hello.statsAddress: %q is not ip:port the control plane can connect to", a)
		}
		// The control plane fetches it: it must be the proxy's own host,
		// not an address the proxy would have the control plane visit.
		if peer, err := netip.ParseAddrPort(peerAddr); err != nil || peer.Addr().Unmap() != ap.Addr().Unmap() {
			return w, nil, fmt.Errorf("hello.statsAddress: %s is not on the proxy's own address %s", a, peerAddr)
		}
	}
	return w, ports, nil
}

func peerChain(ctx context.Context) ([]*x509.Certificate, string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, "", status.Error(codes.Unauthenticated, "no peer information")
	}
	addr := ""
	if p.Addr != nil {
		addr = p.Addr.String()
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return nil, addr, status.Error(codes.Unauthenticated, "discovery needs the proxy's SVID as TLS client certificate")
	}
	return info.State.PeerCertificates, addr, nil
}

// ProxyStatus is what the control plane knows about one proxy.
type ProxyStatus struct {
	Instance          string    `json:"instance"`
	Workload          string    `json:"workload"`
	Identity          string    `json:"identity"`
	Peer              string    `json:"peer,omitempty"`
	Connected         bool      `json:"connected"`
	ConnectedAt       time.Time `json:"connectedAt,omitzero"`
	LastSeen          time.Time `json:"lastSeen,omitzero"`
	DisconnectedAt    time.Time `json:"disconnectedAt,omitzero"`
	CertificateExpiry time.Time `json:"certificateExpiry,omitzero"`
	// CertificateIssued is its certificate's start of validity: with the
	// expiry, it tells a certificate overdue for renewal.
	CertificateIssued time.Time `json:"certificateIssued,omitzero"`
	// CurrentVersion is the version of the proxy's view now; AckedVersion
	// the last one it applied.
	CurrentVersion string `json:"currentVersion"`
	AckedVersion   string `json:"ackedVersion"`
	// Rejected is the reason of the proxy's last NACK, for RejectedVersion.
	Rejected        string `json:"rejected,omitempty"`
	RejectedVersion string `json:"rejectedVersion,omitempty"`
	InSync          bool   `json:"inSync"`
	// Stats is where the proxy serves its metrics (ip:port), if anywhere.
	Stats string `json:"stats,omitempty"`
}

// Status lists the connected proxies and the instances kept in service
// while their proxy is away, sorted by instance.
func (s *Server) Status() []ProxyStatus {
	snap := s.cfg.Registry.Snapshot()
	stats := map[string]string{}
	for _, in := range snap.Instances {
		stats[in.Key()] = in.Stats
	}
	s.mu.Lock()
	connected := map[string]bool{}
	var out []ProxyStatus
	for st := range s.streams {
		ref := st.workload.Ref()
		cur := ""
		if v := s.views[ref]; v != nil {
			cur = v.version
		}
		st.mu.Lock()
		ps := ProxyStatus{
			Instance: ref + "/" + st.instance, Workload: ref, Identity: st.identity.String(), Peer: st.peer,
			Connected: true, ConnectedAt: st.connectedAt, LastSeen: st.lastSeen, CertificateExpiry: st.certExpiry, CertificateIssued: st.certIssued,
			CurrentVersion: cur, AckedVersion: st.acked, Rejected: st.nack, RejectedVersion: st.nackFor,
			InSync: cur != "" && st.acked == cur, Stats: stats[ref+"/"+st.instance],
		}
		st.mu.Unlock()
		connected[ps.Instance] = true
		out = append(out, ps)
	}
	s.mu.Unlock()
	for _, in := range snap.Instances {
		if connected[in.Key()] || in.DisconnectedAt.IsZero() {
			continue
		}
		out = append(out, ProxyStatus{
			Instance: in.Key(), Workload: in.Namespace + "/" + in.Workload, Identity: in.Identity,
			DisconnectedAt: in.DisconnectedAt,
		})
	}
	sortStatus(out)
	return out
}

func sortStatus(list []ProxyStatus) {
	slices.SortFunc(list, func(a, b ProxyStatus) int {
		return cmp.Or(cmp.Compare(a.Instance, b.Instance), a.ConnectedAt.Compare(b.ConnectedAt))
	})
}
