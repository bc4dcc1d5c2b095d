package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/meshmetrics"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/sniff"
)

// route is one destination the application calls: its endpoints, the
// identity each must prove, and a round-robin cursor. A route belongs to one
// routing table and never changes; an update builds new ones.
type route struct {
	service   string
	protocol  config.Protocol
	endpoints []endpoint // empty while the service has no ready instance
	next      atomic.Uint64
	// external is set for a destination outside the mesh: its endpoints
	// have no identity, and it says how to reach them.
	external *originator
}

// tlsLabel is the route's metrics tls label: mesh routes are mutual TLS;
// an external one is TLS when the proxy originates it.
func (r *route) tlsLabel() string {
	if r.external != nil && !r.external.secured() {
		return "false"
	}
	return "true"
}

type endpoint struct {
	addr  string
	id    spiffeid.ID
	label string
	// peer holds the pooled connections to the endpoint, shared by every
	// route (and table) that lists the same address and identity.
	peer *peer
}

// newRoute builds the route of a validated destination; peerFor supplies
// the connection pool of each mesh endpoint, external the originator of an
// external destination.
func newRoute(out config.Outbound, peerFor func(addr string, id spiffeid.ID) *peer, external func(config.Outbound) *originator) *route {
	r := &route{service: out.Service, protocol: out.Protocol}
	if out.External {
		r.external = external(out)
		for _, ep := range out.Endpoints {
			r.endpoints = append(r.endpoints, endpoint{addr: ep.Address, label: out.Service})
		}
		return r
	}
	for _, ep := range out.Endpoints {
		id := spiffeid.RequireFromString(ep.Identity) // validated with the table
		r.endpoints = append(r.endpoints, endpoint{addr: ep.Address, id: id, label: id.String(), peer: peerFor(ep.Address, id)})
	}
	return r
}

// Pick chooses the endpoint for the n-th request: round robin, the choice
// every mesh starts from and the one that needs no state about peers.
func Pick(n uint64, count int) int { return int(n % uint64(count)) }

func (r *route) pick() *endpoint {
	return &r.endpoints[Pick(r.next.Add(1)-1, len(r.endpoints))]
}

// handleListenerOutbound serves a connection to the listener of the static
// configuration's outbound entry i, whose route the table in force says.
func (p *Proxy) handleListenerOutbound(c net.Conn, i int) {
	target := outboundTarget{listener: i}
	p.handleOutbound(c, p.table.Load().resolve(target), target)
}

// handleOutbound serves one connection from the application to a
// destination: HTTP is parsed and each request sent over a pooled mTLS
// connection; anything else is one mTLS stream. rt is the route when the
// connection arrived, which decides its handling and, for a stream, where
// it goes; each HTTP request resolves target again.
func (p *Proxy) handleOutbound(c net.Conn, rt *route, target outboundTarget) {
	if !p.waitReady() {
		p.refuse(c, "outbound", "no certificate yet")
		return
	}
	r := bufio.NewReaderSize(c, 4096)
	meta := &connMeta{direction: "outbound", protocol: rt.protocol, target: target, tlsLabel: "true", peerLabel: p.selfLabel()}
	pc := &peekConn{Conn: c, r: r, meta: meta}
	switch rt.protocol {
	case config.ProtocolHTTP, config.ProtocolHTTP2, config.ProtocolGRPC:
		p.outboundConns.push(pc)
		return
	case config.ProtocolTCP, config.ProtocolServerFirst:
		p.serveOutboundTCP(pc, rt)
		return
	}
	// Undeclared: a client of a server-first protocol says nothing, so
	// wait only briefly before treating the stream as opaque.
	kind, _ := peek(r, c, sniffTimeout)
	if kind == sniff.HTTP1 || kind == sniff.HTTP2 {
		p.outboundConns.push(pc)
		return
	}
	p.serveOutboundTCP(pc, rt)
}

// serveOutboundTCP relays an opaque stream over its own mTLS connection to
// one endpoint, trying the others if it cannot be reached.
func (p *Proxy) serveOutboundTCP(c net.Conn, rt *route) {
	up, ep, err := p.dialRoute(rt)
	if err != nil {
		p.refuse(c, "outbound", err.reason, "service", rt.service, "err", fmt.Sprint(err.err))
		return
	}
	p.relayMesh(c, up, ep, rt.tlsLabel())
}

// routeError says why no endpoint of a route could be reached.
type routeError struct {
	reason string // a metric label: what went wrong, in few words
	err    error  // the last endpoint's error, if any
}

func (e *routeError) Error() string {
	if e.err == nil {
		return e.reason
	}
	return e.reason + ": " + e.err.Error()
}

// dialRoute opens an mTLS stream to an endpoint of rt, trying the others
// in turn if one cannot be reached or does not prove its identity.
func (p *Proxy) dialRoute(rt *route) (net.Conn, *endpoint, *routeError) {
	if len(rt.endpoints) == 0 {
		return nil, nil, &routeError{reason: "destination has no endpoints"}
	}
	if rt.external != nil {
		ep := rt.pick()
		ctx, cancel := context.WithTimeout(context.Background(), dialTimeout+handshakeTimeout)
		defer cancel()
		up, err := rt.external.dial(ctx, ep.addr)
		if err != nil {
			if p.logLimit.allow("external/" + rt.service) {
				p.log.Error("external destination unreachable", "host", rt.service, "endpoint", ep.addr, "err", err)
			}
			return nil, nil, &routeError{reason: "external destination unreachable", err: err}
		}
		return up, ep, nil
	}
	var lastErr error
	for range rt.endpoints {
		ep := rt.pick()
		ctx, cancel := context.WithTimeout(context.Background(), dialTimeout+handshakeTimeout)
		up, err := p.dialMesh(ctx, ep.addr, ALPNTCP, ep.id)
		cancel()
		if err != nil {
			lastErr = err
			if errors.Is(err, errWrongIdentity) {
				p.logSecureNaming(ep, err)
			}
			continue
		}
		return up, ep, nil
	}
	return nil, nil, &routeError{reason: "no endpoint reachable", err: lastErr}
}

// relayMesh relays the application's stream c over up, the stream to ep
// (mTLS to a mesh endpoint; to an external one, as its route says), until
// both directions end.
func (p *Proxy) relayMesh(c, up net.Conn, ep *endpoint, tlsLabel string) {
	if p.metrics != nil {
		p.metrics.connections.WithLabelValues("outbound", p.selfLabel(), ep.label, tlsLabel, "allow", "").Inc()
	}
	p.relay(c, up, "outbound", p.selfLabel(), ep.label, tlsLabel)
}

func (p *Proxy) logSecureNaming(ep *endpoint, err error) {
	if p.logLimit.allow("secure-naming/" + ep.addr) {
		p.log.Error("endpoint refused: it did not prove the expected identity", "endpoint", ep.addr, "want", ep.id.String(), "err", err)
	}
}

// outboundCall is one application request on its way out: the route it
// resolved to, the endpoint tried last, and the pool whose connection
// carries the response, held until the response is done.
type outboundCall struct {
	route *route
	used  *endpoint
	pool  *meshPool
}

type outboundCallKey struct{}

func callFrom(ctx context.Context) *outboundCall {
	c, _ := ctx.Value(outboundCallKey{}).(*outboundCall)
	return c
}

// serveOutboundHTTP sends one application request to an endpoint of its
// destination over the pooled mTLS connection to that endpoint.
func (p *Proxy) serveOutboundHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	m := metaFrom(r.Context())
	tbl := p.table.Load()
	call := &outboundCall{route: tbl.resolve(m.target)}
	if m.target.httpProxy {
		if call.route = p.proxyRoute(w, r, tbl); call.route == nil {
			return // answered: CONNECT, outside the mesh, or a bad request
		}
	}
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	// Deferred so that it also runs when the reverse proxy aborts a
	// response half-way by panicking.
	defer call.done()
	switch {
	case call.route == nil:
		// An intercepted destination that an update removed while this
		// connection was open; a new connection passes through.
		rec.Header().Set("Connection", "close")
		http.Error(rec, fmt.Sprintf("trellis: %s is no longer a mesh destination; reconnect", m.target.dst), http.StatusServiceUnavailable)
	case len(call.route.endpoints) == 0:
		http.Error(rec, fmt.Sprintf("trellis: %s unavailable: it has no endpoints (no instance is ready, or the control plane has sent none)", call.route.service), http.StatusServiceUnavailable)
	default:
		r = r.WithContext(context.WithValue(r.Context(), outboundCallKey{}, call))
		guardBody(w, r)
		p.outboundProxy.ServeHTTP(rec, r)
	}
	if p.metrics != nil {
		dest := meshmetrics.Unreachable
		if call.used != nil {
			dest = call.used.label
		}
		tlsLabel := "true"
		if call.route != nil {
			tlsLabel = call.route.tlsLabel()
		}
		p.metrics.requests.WithLabelValues("outbound", m.peerLabel, dest, tlsLabel, "", "", statusClass(rec.status)).Inc()
		p.metrics.duration.WithLabelValues("outbound", m.peerLabel, dest, tlsLabel).Observe(time.Since(start).Seconds())
	}
	if p.tap.tapped() {
		dest := meshmetrics.Unreachable
		if call.used != nil {
			dest = call.used.label
		}
		p.tap.publish(TapEvent{Time: start, Direction: "outbound", Source: m.peerLabel, Destination: dest, Authority: r.Host,
			Method: r.Method, Path: r.URL.Path, Status: rec.status, Latency: time.Since(start), TLS: call.route == nil || call.route.tlsLabel() == "true"})
	}
}

// done lets go of the pool that carried the response.
func (c *outboundCall) done() {
	if c.pool != nil {
		c.pool.release()
		c.pool = nil
	}
}

// newOutboundProxy returns the reverse proxy that carries every
// application request to its destination. Its host is a placeholder:
// failover sends each attempt to an endpoint of the request's route, which
// also names the destination in error responses.
func newOutboundProxy(mt *meshTransport, logger *slog.Logger) *httputil.ReverseProxy {
	return newForwarder("http", "mesh.invalid", &failover{mesh: mt}, logger, func(r *http.Request) string {
		if call := callFrom(r.Context()); call != nil && call.route != nil {
			return call.route.service
		}
		return "the destination"
	})
}

// failover sends a request to the route's next endpoint (round robin) and,
// when that endpoint cannot be reached or does not prove its identity —
// failures that happen before any of the request is sent — to the others
// in turn. Errors after the request went out are returned as they are: a
// retry could repeat a request the server has acted on. The route comes
// with the request (outboundCall), so one failover serves every route.
type failover struct {
	mesh *meshTransport
}

func (f *failover) RoundTrip(req *http.Request) (*http.Response, error) {
	call := callFrom(req.Context())
	if call == nil || call.route == nil || len(call.route.endpoints) == 0 {
		return nil, errors.New("no endpoint to send the request to")
	}
	eps := call.route.endpoints
	first := Pick(call.route.next.Add(1)-1, len(eps))
	if ext := call.route.external; ext != nil {
		// Outside the mesh: one endpoint, over the originator's pooled
		// connections (TLS when the DestinationRule says so).
		ep := &eps[first]
		call.used = ep
		out := *req
		u := *req.URL
		u.Scheme, u.Host = ext.scheme(), ep.addr
		out.URL = &u
		resp, err := ext.transport.RoundTrip(&out)
		if p := f.mesh.p; err != nil && req.Context().Err() == nil && p.logLimit.allow("external/"+call.route.service) {
			p.log.Error("external destination unreachable", "host", call.route.service, "endpoint", ep.addr, "err", err)
		}
		return resp, err
	}
	svid := f.mesh.p.opts.Identity.Current()
	// A transport closes the body when it fails, even before sending any of
	// it; keep it open across attempts and close it once at the end.
	var body *retryBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryBody{rc: req.Body}
		defer body.closeIfUnused()
	}
	var lastErr error
	for i := range eps {
		ep := &eps[(first+i)%len(eps)]
		call.used = ep
		pool := ep.peer.acquire(svid)
		transport := pool.h2
		if isUpgrade(req) {
			transport = pool.h1
		}
		out := *req
		u := *req.URL
		u.Host = ep.addr
		out.URL = &u
		if body != nil {
			out.Body = body
		}
		resp, err := transport.RoundTrip(&out)
		if err == nil {
			if body != nil {
				body.handedOver.Store(true)
			}
			call.pool = pool // released when the response is done
			return resp, nil
		}
		pool.release()
		lastErr = err
		var de *dialError
		if !errors.As(err, &de) || req.Context().Err() != nil || body != nil && body.read.Load() {
			return nil, err
		}
	}
	return nil, lastErr
}

// retryBody lets a request body survive a failed attempt that never read
// it; once read, the request cannot be retried.
// The transport reads and closes it from its own goroutines, hence atomics.
type retryBody struct {
	rc         io.ReadCloser
	read       atomic.Bool
	handedOver atomic.Bool
}

func (b *retryBody) Read(p []byte) (int, error) {
	b.read.Store(true)
	return b.rc.Read(p)
}

// Close is ignored until an attempt has succeeded; the server closes the
// incoming body after the handler in any case.
func (b *retryBody) Close() error {
	if b.handedOver.Load() {
		return b.rc.Close()
	}
	return nil
}

func (b *retryBody) closeIfUnused() {
	if !b.handedOver.Load() {
		_ = b.rc.Close()
	}
}

// dialError marks a failure to reach an endpoint: nothing of the request
// was sent, so another endpoint may be tried.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && r.ProtoMajor == 1
}

// meshTransport opens the pooled connections to peer proxies. Each
// endpoint has a peer with a pool of its own: one transport multiplexing
// HTTP/2 requests over long-lived mTLS connections, and an HTTP/1.1 one for
// upgrades (WebSocket), which need a connection of their own. Both speak
// prior-knowledge HTTP inside the mTLS stream the proxy opened itself, so
// net/http never sees the mesh ALPN.
//
// Pools are per endpoint, rather than one pool keyed by address, because a
// pooled connection was verified against the identity the endpoint had
// when it was opened: when an update gives an address another identity, or
// removes it, the connections to it must not serve new requests, while
// those to every other endpoint carry on untouched.
type meshTransport struct {
	p *Proxy
	// pools and conns count the pools not yet closed and the pooled
	// connections open, so that a test can tell that updates and
	// rotations do not leak them.
	pools, conns atomic.Int64
}

func newMeshTransport(p *Proxy) *meshTransport { return &meshTransport{p: p} }

// peer is one endpoint as the mesh transport sees it: an address and the
// identity the server there must prove. Both are fixed; an address with a
// new identity is a new peer.
type peer struct {
	mt   *meshTransport
	addr string
	id   spiffeid.ID
	cur  atomic.Pointer[meshPool]
	mu   sync.Mutex // serializes replacing cur, and retiring
	gone bool       // left the routing table; guarded by mu
}

func (mt *meshTransport) newPeer(addr string, id spiffeid.ID) *peer {
	return &peer{mt: mt, addr: addr, id: id}
}

// meshPool is a peer's connections for one SVID of ours. A pooled
// connection presents the certificate it was opened with for as long as it
// lives, so after a rotation new requests go to a fresh pool.
//
// refs counts who holds the pool: its peer while it is the peer's current
// pool, and each request whose response it carries. The last to let go
// closes every connection, so a pool that was replaced (rotation) or whose
// endpoint left the routing table goes as soon as its in-flight requests
// are done, and never before.
type meshPool struct {
	mt     *meshTransport
	svid   *identity.SVID
	h2, h1 *http.Transport
	refs   atomic.Int64

	mu     sync.Mutex
	open   map[net.Conn]struct{} // the connections dialled and not yet closed
	closed bool
}

// acquire returns the peer's pool for svid, held for the caller until it
// calls release. A request that resolved its route just before an update
// retired the peer still gets a pool: one of its own, which closes when the
// request is done.
func (pe *peer) acquire(svid *identity.SVID) *meshPool {
	for {
		pl := pe.cur.Load()
		if pl != nil && pl.svid == svid && pl.tryAcquire() {
			return pl
		}
		pe.mu.Lock()
		if pe.cur.Load() != pl {
			pe.mu.Unlock()
			continue // another request replaced it meanwhile
		}
		fresh := pe.mt.newPool(pe, svid)
		var replaced *meshPool
		if pe.gone {
			fresh.refs.Store(1) // the caller's only: a retired peer holds none
		} else {
			fresh.refs.Store(2) // the peer's and the caller's
			replaced = pl
		}
		pe.cur.Store(fresh)
		pe.mu.Unlock()
		if replaced != nil {
			// In-flight requests finish on the old connections; the last
			// of them closes the pool.
			replaced.release()
		}
		return fresh
	}
}

// retire is called once the peer has left the routing table: its pool
// closes when the requests in flight on it are done.
func (pe *peer) retire() {
	pe.mu.Lock()
	if pe.gone {
		pe.mu.Unlock()
		return
	}
	pe.gone = true
	pl := pe.cur.Load()
	pe.mu.Unlock()
	if pl != nil {
		pl.release()
	}
}

// closeIdle closes the idle connections of the peer's current pool.
func (pe *peer) closeIdle() {
	if pl := pe.cur.Load(); pl != nil {
		pl.h2.CloseIdleConnections()
		pl.h1.CloseIdleConnections()
	}
}

// tryAcquire takes a reference unless the pool has already closed.
func (pl *meshPool) tryAcquire() bool {
	for {
		n := pl.refs.Load()
		if n == 0 {
			return false
		}
		if pl.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (pl *meshPool) release() {
	if pl.refs.Add(-1) == 0 {
		pl.close()
	}
}

// close ends every connection of a pool nobody holds. Closing idle ones
// would not be enough: an HTTP/2 connection counts as busy for a moment
// after its last response was read, and would then linger until it timed
// out.
func (pl *meshPool) close() {
	pl.h2.CloseIdleConnections()
	pl.h1.CloseIdleConnections()
	pl.mu.Lock()
	pl.closed = true
	open := pl.open
	pl.open = nil
	pl.mu.Unlock()
	for c := range open {
		c.Close()
	}
	pl.mt.pools.Add(-1)
}

func (mt *meshTransport) newPool(pe *peer, svid *identity.SVID) *meshPool {
	p := mt.p
	pl := &meshPool{mt: mt, svid: svid, open: map[net.Conn]struct{}{}}
	dial := func(alpn string) func(ctx context.Context, _, _ string) (net.Conn, error) {
		// The transport asks for the address the request names, which
		// failover set to the peer's own.
		return func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := p.dialMesh(ctx, pe.addr, alpn, pe.id)
			if err != nil {
				if errors.Is(err, errWrongIdentity) {
					p.logSecureNaming(&endpoint{addr: pe.addr, id: pe.id}, err)
				}
				return nil, &dialError{err}
			}
			return pl.track(c)
		}
	}
	pl.h2 = &http.Transport{
		DialContext:        dial(ALPNHTTP2),
		Protocols:          new(http.Protocols),
		IdleConnTimeout:    5 * time.Minute,
		DisableCompression: true,
		HTTP2: &http.HTTP2Config{
			SendPingTimeout:  30 * time.Second, // ping idle connections to notice dead peers
			PingTimeout:      5 * time.Second,
			WriteByteTimeout: 30 * time.Second,
		},
	}
	pl.h2.Protocols.SetUnencryptedHTTP2(true)
	pl.h1 = &http.Transport{
		DialContext:         dial(ALPNHTTP1),
		Protocols:           new(http.Protocols),
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	pl.h1.Protocols.SetHTTP1(true)
	mt.pools.Add(1)
	return pl
}

// track registers a connection the pool dialled, so that closing the pool
// can end it; a dial that completes after the pool closed is undone.
func (pl *meshPool) track(c net.Conn) (net.Conn, error) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		c.Close()
		return nil, &dialError{errors.New("connection pool closed")}
	}
	pc := &pooledConn{Conn: c, pool: pl}
	pl.open[pc] = struct{}{}
	pl.mt.conns.Add(1)
	return pc, nil
}

// pooledConn is a mesh connection in a pool. It hides the *tls.Conn from
// net/http, which would otherwise look for HTTP/2 in the TLS ALPN (the mesh
// negotiated its own), and it leaves the pool's books when it closes.
type pooledConn struct {
	net.Conn
	pool *meshPool
	once sync.Once
}

func (c *pooledConn) Close() error {
	c.once.Do(func() {
		c.pool.mu.Lock()
		delete(c.pool.open, c)
		c.pool.mu.Unlock()
		c.pool.mt.conns.Add(-1)
	})
	return c.Conn.Close()
}

// closeIdle closes the idle pooled connections of every endpoint in the
// table, as shutdown does once requests have drained.
func (mt *meshTransport) closeIdle() {
	for _, pe := range mt.p.table.Load().peers {
		pe.closeIdle()
	}
}
