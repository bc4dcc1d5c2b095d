package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/sniff"
)

// route is one destination the application calls: its endpoints, the
// identity each must prove, and a round-robin cursor.
type route struct {
	service   string
	protocol  config.Protocol
	endpoints []endpoint
	next      atomic.Uint64
	// http forwards the application's requests, with failover between
	// endpoints; built by the proxy, which owns the transports.
	http *httputil.ReverseProxy
}

type endpoint struct {
	addr  string
	id    spiffeid.ID
	label string
}

func newRoute(out config.Outbound) *route {
	r := &route{service: out.Service, protocol: out.Protocol}
	for _, ep := range out.Endpoints {
		id := spiffeid.RequireFromString(ep.Identity) // validated with the config
		r.endpoints = append(r.endpoints, endpoint{addr: ep.Address, id: id, label: id.String()})
	}
	return r
}

// Pick chooses the endpoint for the n-th request: round robin, the choice
// every mesh starts from and the one that needs no state about peers.
func Pick(n uint64, count int) int { return int(n % uint64(count)) }

func (r *route) pick() *endpoint {
	return &r.endpoints[Pick(r.next.Add(1)-1, len(r.endpoints))]
}

// handleOutbound serves one connection from the application to a
// destination: HTTP is parsed and each request sent over a pooled mTLS
// connection; anything else is one mTLS stream.
func (p *Proxy) handleOutbound(c net.Conn, rt *route) {
	if !p.waitReady() {
		p.refuse(c, "outbound", "no certificate yet")
		return
	}
	r := bufio.NewReaderSize(c, 4096)
	meta := &connMeta{direction: "outbound", protocol: rt.protocol, route: rt, tlsLabel: "true", peerLabel: p.selfLabel()}
	pc := &peekConn{Conn: c, r: r, meta: meta}
	switch rt.protocol {
	case config.ProtocolHTTP, config.ProtocolHTTP2, config.ProtocolGRPC:
		p.outboundConns.push(pc)
		return
	case config.ProtocolTCP, config.ProtocolServerFirst:
		p.serveOutboundTCP(pc)
		return
	}
	// Undeclared: a client of a server-first protocol says nothing, so
	// wait only briefly before treating the stream as opaque.
	kind, _ := peek(r, c, sniffTimeout)
	if kind == sniff.HTTP1 || kind == sniff.HTTP2 {
		p.outboundConns.push(pc)
		return
	}
	p.serveOutboundTCP(pc)
}

// serveOutboundTCP relays an opaque stream over its own mTLS connection to
// one endpoint, trying the others if it cannot be reached.
func (p *Proxy) serveOutboundTCP(pc *peekConn) {
	rt := pc.meta.route
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
		if p.metrics != nil {
			p.metrics.connections.WithLabelValues("outbound", p.selfLabel(), ep.label, "true", "allow", "").Inc()
		}
		p.relay(pc, up, "outbound", p.selfLabel(), ep.label, "true")
		return
	}
	p.refuse(pc, "outbound", "no endpoint reachable", "service", rt.service, "err", fmt.Sprint(lastErr))
}

func (p *Proxy) logSecureNaming(ep *endpoint, err error) {
	if p.logLimit.allow("secure-naming/" + ep.addr) {
		p.log.Error("endpoint refused: it did not prove the expected identity", "endpoint", ep.addr, "want", ep.id.String(), "err", err)
	}
}

// serveOutboundHTTP sends one application request to an endpoint of its
// destination over the pooled mTLS connection to that endpoint.
func (p *Proxy) serveOutboundHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	m := metaFrom(r.Context())
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	var used *endpoint
	r = r.WithContext(context.WithValue(r.Context(), usedEndpointKey{}, &used))
	guardBody(w, r)
	m.route.http.ServeHTTP(rec, r)
	if p.metrics != nil {
		dest := "unreachable"
		if used != nil {
			dest = used.label
		}
		p.metrics.requests.WithLabelValues("outbound", m.peerLabel, dest, "true", "", "", statusClass(rec.status)).Inc()
		p.metrics.duration.WithLabelValues("outbound", m.peerLabel, dest, "true").Observe(time.Since(start).Seconds())
	}
}

type usedEndpointKey struct{}

// failover sends a request to the route's next endpoint (round robin) and,
// when that endpoint cannot be reached or does not prove its identity —
// failures that happen before any of the request is sent — to the others
// in turn. Errors after the request went out are returned as they are: a
// retry could repeat a request the server has acted on.
type failover struct {
	route *route
	mesh  *meshTransport
}

func (f *failover) RoundTrip(req *http.Request) (*http.Response, error) {
	pool := f.mesh.pool()
	transport := pool.h2
	if isUpgrade(req) {
		transport = pool.h1
	}
	eps := f.route.endpoints
	first := Pick(f.route.next.Add(1)-1, len(eps))
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
		if used, ok := req.Context().Value(usedEndpointKey{}).(**endpoint); ok {
			*used = ep
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
			return resp, nil
		}
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

// meshTransport holds the pooled connections to peer proxies: one transport
// multiplexing HTTP/2 requests over long-lived mTLS connections, and an
// HTTP/1.1 one for upgrades (WebSocket), which need a connection of their
// own. Both speak prior-knowledge HTTP inside the mTLS stream the proxy
// opened itself, so net/http never sees the mesh ALPN.
//
// A pooled connection presents the certificate it was opened with for as
// long as it lives, so the pool belongs to one SVID: after a rotation new
// requests go to a fresh pool, and the old one is closed as it falls idle.
type meshTransport struct {
	p   *Proxy
	ids map[string]spiffeid.ID // endpoint address → identity it must prove

	cur atomic.Pointer[meshPool]
	mu  sync.Mutex // serializes replacing the pool
}

type meshPool struct {
	svid   *identity.SVID
	h2, h1 *http.Transport
}

func newMeshTransport(p *Proxy) *meshTransport {
	mt := &meshTransport{p: p, ids: map[string]spiffeid.ID{}}
	for _, out := range p.opts.Config.Outbound {
		for _, ep := range out.Endpoints {
			mt.ids[ep.Address] = spiffeid.RequireFromString(ep.Identity)
		}
	}
	return mt
}

// pool returns the connection pool for the proxy's current certificate,
// starting a new one after a rotation.
func (mt *meshTransport) pool() *meshPool {
	svid := mt.p.opts.Identity.Current()
	if pl := mt.cur.Load(); pl != nil && pl.svid == svid {
		return pl
	}
	mt.mu.Lock()
	defer mt.mu.Unlock()
	old := mt.cur.Load()
	if old != nil && old.svid == svid {
		return old
	}
	pl := mt.newPool(svid)
	mt.cur.Store(pl)
	if old != nil {
		// In-flight requests finish on the old connections; idle ones go
		// now, the rest when they fall idle (IdleConnTimeout).
		old.closeIdle()
	}
	return pl
}

func (mt *meshTransport) newPool(svid *identity.SVID) *meshPool {
	p := mt.p
	dial := func(alpn string) func(ctx context.Context, _, addr string) (net.Conn, error) {
		return func(ctx context.Context, _, addr string) (net.Conn, error) {
			want, ok := mt.ids[addr]
			if !ok {
				return nil, fmt.Errorf("no identity known for endpoint %s", addr)
			}
			c, err := p.dialMesh(ctx, addr, alpn, want)
			if err != nil {
				if errors.Is(err, errWrongIdentity) {
					p.logSecureNaming(&endpoint{addr: addr, id: want}, err)
				}
				return nil, &dialError{err}
			}
			return &metaConn{Conn: c}, nil
		}
	}
	pl := &meshPool{svid: svid}
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
	return pl
}

func (pl *meshPool) closeIdle() {
	pl.h2.CloseIdleConnections()
	pl.h1.CloseIdleConnections()
}

func (mt *meshTransport) closeIdle() {
	if pl := mt.cur.Load(); pl != nil {
		pl.closeIdle()
	}
}
