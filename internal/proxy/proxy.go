// Package proxy is the Trellis data plane: the sidecar that terminates mesh
// mTLS for its workload (inbound) and originates it for the workload's calls
// (outbound), enforcing PeerAuthentication modes and AuthorizationPolicies
// per connection or per request, checking that every server it reaches
// proves the identity the destination should have (secure naming), and
// recording golden metrics.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// Timeouts. A peer gets a bounded time to say anything and to finish the
// TLS handshake, so that idle or slow-loris connections cannot pile up.
const (
	firstBytesTimeout = 10 * time.Second
	handshakeTimeout  = 10 * time.Second
	dialTimeout       = 5 * time.Second
	// sniffTimeout is how long a port without a declared protocol waits for
	// the client's first bytes before treating the connection as opaque TCP
	// (a server-speaks-first protocol); short, so such clients barely notice.
	sniffTimeout = 100 * time.Millisecond
	// readyWait is how long traffic waits for the first certificate before
	// it is refused.
	readyWait = 5 * time.Second
	// DrainTimeout bounds how long shutdown waits for in-flight requests.
	DrainTimeout = 10 * time.Second
	// idleTimeout closes HTTP connections that carry nothing for this long.
	idleTimeout = 5 * time.Minute
)

// Options configure a Proxy.
type Options struct {
	Config   *config.Config
	Identity *identity.Holder
	Log      *slog.Logger
	Metrics  *Metrics
	// Now is the clock used to verify peer certificates; nil means time.Now.
	Now func() time.Time
	// PolicyReload is how often the policy directory is checked for edits.
	PolicyReload time.Duration
	// AwaitUpdate starts the proxy closed: every inbound port STRICT and
	// every request denied, until the first Apply. A proxy that takes its
	// policies from the control plane must not serve its workload openly
	// while it waits for them.
	AwaitUpdate bool
}

// Proxy is one sidecar.
type Proxy struct {
	opts     Options
	log      *slog.Logger
	metrics  *Metrics
	verifier peerVerifier
	workload policy.Workload
	policies atomic.Pointer[policyState]

	inboundHTTP   *http.Server // requests to the workload, plaintext or from mesh peers
	outboundHTTP  *http.Server // the application's HTTP calls
	inboundConns  *chanListener
	outboundConns *chanListener
	// gatewayHTTP serves an ingress gateway's listeners (gateway mode).
	gatewayHTTP *http.Server

	appHTTP1, appH2C http.RoundTripper // to the local application
	mesh             *meshTransport    // to peer proxies
	// dialer opens every connection the proxy makes; under transparent
	// interception it marks them so the iptables rules let them pass.
	dialer *net.Dialer

	// outboundProxy forwards every application request, whatever its
	// route: the route travels with the request, so no per-route state
	// outlives an update.
	outboundProxy *httputil.ReverseProxy
	// outsideProxy forwards HTTP proxy requests for destinations outside
	// the mesh (nil without an HTTP proxy listener).
	outsideProxy *httputil.ReverseProxy
	// listenPorts are the ports of the proxy's listeners, which a request
	// to the HTTP proxy must not name (it would loop).
	listenPorts map[uint32]bool
	// table is where outbound traffic goes; Apply replaces it whole.
	table atomic.Pointer[routeTable]
	// applyMu serializes Apply: each update is built from the table it
	// replaces.
	applyMu       sync.Mutex
	inboundByPort map[uint32]config.Inbound

	// connsMu guards conns and draining's transition, so no connection is
	// added once shutdown has started counting.
	connsMu sync.Mutex
	// conns are the accepted connections being handled, so shutdown can
	// wait for them and close what is left at the deadline.
	conns map[net.Conn]*connMeta // meta once the connection is classified
	// upstreams are the connections relays opened, closed with the
	// accepted ones when the drain deadline passes.
	upstreams map[net.Conn]struct{}
	connsWG   sync.WaitGroup
	draining  atomic.Bool
	logLimit  *logLimiter
	// tap passes requests to live taps (trellis tap).
	tap *tapHub
}

// New validates opts and builds a proxy; Run starts it.
func New(opts Options) (*Proxy, error) {
	if opts.Config == nil || opts.Identity == nil {
		return nil, errors.New("proxy: a configuration and an identity are required")
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.PolicyReload == 0 {
		opts.PolicyReload = 2 * time.Second
	}
	cfg := opts.Config
	if cfg.Policies != "" {
		if err := policyDirExists(cfg.Policies); err != nil {
			return nil, fmt.Errorf("proxy: policies: %w", err)
		}
	}
	p := &Proxy{
		opts:      opts,
		log:       opts.Log,
		metrics:   opts.Metrics,
		verifier:  peerVerifier{holder: opts.Identity, now: opts.Now},
		workload:  policy.Workload{Namespace: cfg.Workload.Namespace, Name: cfg.Workload.Name, Labels: cfg.Workload.Labels},
		logLimit:  newLogLimiter(time.Minute),
		tap:       newTapHub(),
		conns:     map[net.Conn]*connMeta{},
		upstreams: map[net.Conn]struct{}{},
	}
	var st *policyState
	var err error
	if opts.AwaitUpdate {
		if cfg.Policies != "" {
			return nil, fmt.Errorf("proxy: policies: %w (%s)", ErrPoliciesFromDirectory, cfg.Policies)
		}
		st, err = compilePolicies(awaitingPolicies(), p.workload, AwaitingVersion)
	} else {
		st, err = loadPolicyDir(cfg.Policies, p.workload)
	}
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	p.policies.Store(st)
	p.dialer = &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	if cfg.Transparent.MarksSockets() {
		p.dialer.Control = intercept.MarkControl
	}
	p.inboundByPort = map[uint32]config.Inbound{}
	for _, in := range cfg.Inbound {
		p.inboundByPort[in.AppPort] = in
	}
	p.appHTTP1, p.appH2C = newAppTransports(p.dialer)
	p.mesh = newMeshTransport(p)
	tbl, err := buildTable(cfg.Outbound, nil, nil, p.mesh, p.dialer, p.log)
	if err != nil {
		return nil, fmt.Errorf("proxy: outbound: %w", err)
	}
	p.table.Store(tbl)
	p.outboundProxy = newOutboundProxy(p.mesh, p.log)
	if cfg.HTTPProxy != "" {
		p.outsideProxy = newOutsideProxy(p.dialer, p)
	}
	p.listenPorts = map[uint32]bool{}
	for _, addr := range cfg.ListenAddrs() {
		p.listenPorts[uint32(netip.MustParseAddrPort(addr).Port())] = true // validated
	}
	p.buildServers()
	return p, nil
}

// canonicalAddr parses a validated ip:port the way original destinations
// are compared: IPv4-mapped IPv6 unmapped, any spelling of an address equal.
func canonicalAddr(s string) netip.AddrPort {
	ap := netip.MustParseAddrPort(s) // validated with the config
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Ready reports whether the proxy holds a valid certificate and is not
// shutting down.
func (p *Proxy) Ready() bool {
	svid := p.opts.Identity.Current()
	return svid != nil && p.opts.Now().Before(svid.NotAfter()) && !p.draining.Load()
}

// PolicyVersion identifies the policies in force, for /config: a hash of
// the policy directory, "none" without policies, or the version of the
// update that pushed them.
func (p *Proxy) PolicyVersion() string { return p.policies.Load().version }

// ConfigVersion is the version of the last update applied, "" before any.
func (p *Proxy) ConfigVersion() string { return p.table.Load().version }

// Run listens on every configured address and serves until ctx ends, then
// drains: listeners close, in-flight requests get up to DrainTimeout.
func (p *Proxy) Run(ctx context.Context) error {
	cfg := p.opts.Config
	type served struct {
		l      net.Listener
		handle func(net.Conn)
	}
	var listeners []served
	closeAll := func() {
		for _, s := range listeners {
			s.l.Close()
		}
	}
	listen := func(addr, what string, handle func(net.Conn)) error {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("%s: %w", what, err)
		}
		listeners = append(listeners, served{l, handle})
		return nil
	}
	for _, in := range cfg.Inbound {
		if in.Listen == "" {
			continue
		}
		appAddr := net.JoinHostPort(cfg.AppHost, strconv.Itoa(int(in.AppPort)))
		if err := listen(in.Listen, fmt.Sprintf("inbound listener for app port %d", in.AppPort), func(c net.Conn) { p.handleInbound(c, in, appAddr) }); err != nil {
			return err
		}
	}
	for i, out := range cfg.Outbound {
		if out.Listen == "" {
			continue
		}
		if err := listen(out.Listen, "outbound listener for "+out.Service, func(c net.Conn) { p.handleListenerOutbound(c, i) }); err != nil {
			return err
		}
	}
	if cfg.HTTPProxy != "" {
		if err := listen(cfg.HTTPProxy, "HTTP proxy listener", p.handleHTTPProxy); err != nil {
			return err
		}
	}
	var gatewayLns []net.Listener
	if g := cfg.Gateway; g != nil {
		for _, gl := range g.Listeners {
			l, err := net.Listen("tcp", gl.Listen)
			if err == nil {
				var gwl net.Listener
				if gwl, err = gatewayListener(l, gl, p.log); err != nil {
					l.Close()
				} else {
					l = gwl
				}
			}
			if err != nil {
				closeAll()
				for _, l := range gatewayLns {
					l.Close()
				}
				return fmt.Errorf("gateway listener %s: %w", gl.Listen, err)
			}
			gatewayLns = append(gatewayLns, l)
		}
	}
	if t := cfg.Transparent; t != nil {
		if t.Inbound != "" {
			if err := listen(t.Inbound, "transparent inbound listener", p.handleTransparentInbound); err != nil {
				return err
			}
		}
		if t.Outbound != "" {
			if err := listen(t.Outbound, "transparent outbound listener", p.handleTransparentOutbound); err != nil {
				return err
			}
		}
	}

	eg, ctx := errgroup.WithContext(ctx)
	for _, s := range listeners {
		eg.Go(func() error { return p.acceptLoop(ctx, s.l, s.handle) })
	}
	for _, l := range gatewayLns {
		eg.Go(func() error {
			if err := p.gatewayHTTP.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	for _, srv := range []struct {
		s *http.Server
		l *chanListener
	}{{p.inboundHTTP, p.inboundConns}, {p.outboundHTTP, p.outboundConns}} {
		eg.Go(func() error {
			if err := srv.s.Serve(srv.l); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	if cfg.Policies != "" {
		eg.Go(func() error { return p.watchPolicies(ctx, cfg.Policies, p.opts.PolicyReload) })
	}
	eg.Go(func() error {
		<-ctx.Done()
		p.connsMu.Lock()
		p.draining.Store(true)
		p.connsMu.Unlock()
		closeAll()
		p.shutdown()
		return nil
	})
	return eg.Wait()
}

// shutdown drains the HTTP servers and waits (bounded) for TCP streams,
// then closes whatever is still open.
func (p *Proxy) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), DrainTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, s := range []*http.Server{p.inboundHTTP, p.outboundHTTP, p.gatewayHTTP} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Shutdown(ctx); err != nil {
				_ = s.Close()
			}
		}()
	}
	done := make(chan struct{})
	go func() { p.connsWG.Wait(); close(done) }()
	wg.Wait()
	select {
	case <-done:
	case <-ctx.Done():
		p.connsMu.Lock()
		n := len(p.conns)
		for c := range p.conns {
			c.Close()
		}
		for c := range p.upstreams {
			c.Close()
		}
		p.connsMu.Unlock()
		p.log.Warn("drain timed out; closed the remaining connections", "count", n)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.log.Error("connections still being handled after they were closed; exiting anyway")
		}
	}
	p.mesh.closeIdle()
}

// track registers an accepted connection until handle returns; it fails
// once shutdown has begun.
func (p *Proxy) track(c net.Conn) bool {
	p.connsMu.Lock()
	defer p.connsMu.Unlock()
	if p.draining.Load() {
		return false
	}
	p.conns[c] = nil
	p.connsWG.Add(1)
	return true
}

// describe records what an accepted inbound connection turned out to be, so
// a policy change can find the connections it no longer admits. m must not
// change afterwards (its fields are read under connsMu).
func (p *Proxy) describe(c net.Conn, m *connMeta) {
	p.connsMu.Lock()
	defer p.connsMu.Unlock()
	if _, ok := p.conns[c]; ok {
		p.conns[c] = m
	}
}

// closeInadmissible closes the inbound connections that the port's mTLS
// mode under st no longer admits: plaintext after a switch to STRICT, mesh
// mTLS after a switch to DISABLE. HTTP requests are also checked one by
// one; this ends TCP streams, which have no requests to check.
func (p *Proxy) closeInadmissible(st *policyState) {
	p.connsMu.Lock()
	defer p.connsMu.Unlock()
	for c, m := range p.conns {
		if m == nil || m.direction != "inbound" {
			continue
		}
		if mode := st.ports.Mode(m.appPort); !mtls.Admits(mode, m.tls) {
			c.Close()
			if p.logLimit.allow("mode-change/" + string(mode)) {
				p.log.Info("closed a connection the new mTLS mode does not admit", "port", m.appPort, "mode", mode, "tls", m.tls)
			}
		}
	}
}

// trackUpstream registers a connection a relay opened, until release.
func (p *Proxy) trackUpstream(c net.Conn) (release func()) {
	p.connsMu.Lock()
	p.upstreams[c] = struct{}{}
	p.connsMu.Unlock()
	return func() {
		p.connsMu.Lock()
		delete(p.upstreams, c)
		p.connsMu.Unlock()
	}
}

func (p *Proxy) untrack(c net.Conn) {
	p.connsMu.Lock()
	delete(p.conns, c)
	p.connsMu.Unlock()
	p.connsWG.Done()
}

// acceptLoop accepts until ctx ends, handing each connection to handle on
// its own goroutine. Resource exhaustion (too many open files) is waited
// out, as net/http does, rather than taking the sidecar down.
func (p *Proxy) acceptLoop(ctx context.Context, l net.Listener, handle func(net.Conn)) error {
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			if p.logLimit.allow("accept/" + l.Addr().String()) {
				p.log.Error("accept failed; retrying", "listener", l.Addr().String(), "err", err, "retryIn", backoff)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if !p.track(c) {
			c.Close()
			continue
		}
		go func() {
			defer p.untrack(c)
			handle(c)
		}()
	}
}

// waitReady holds a connection that arrives before the first certificate,
// briefly, rather than failing it.
func (p *Proxy) waitReady() bool {
	if p.opts.Identity.Current() != nil {
		return true
	}
	deadline := time.Now().Add(readyWait)
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		if p.opts.Identity.Current() != nil {
			return true
		}
	}
	return false
}

// chanListener is a net.Listener fed by the proxy after it has classified a
// connection, so one http.Server serves every connection of a kind.
type chanListener struct {
	addr   net.Addr
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newChanListener(addr string) *chanListener {
	return &chanListener{addr: staticAddr(addr), conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// push hands c to the server, or closes it if the server is gone.
func (l *chanListener) push(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.closed:
		c.Close()
	}
}

type staticAddr string

func (a staticAddr) Network() string { return "proxy" }
func (a staticAddr) String() string  { return string(a) }

// logLimiter lets one log line per cause through per interval, so a flood of
// bad connections cannot flood the log.
type logLimiter struct {
	every time.Duration
	mu    sync.Mutex
	last  map[string]time.Time
}

func newLogLimiter(every time.Duration) *logLimiter {
	return &logLimiter{every: every, last: map[string]time.Time{}}
}

// logLimiterPrune is how many causes the limiter remembers before it
// forgets those whose interval has passed: some causes name an endpoint,
// and endpoints come and go with control plane updates.
const logLimiterPrune = 1024

func (l *logLimiter) allow(cause string) bool {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.last[cause]; ok && now.Sub(t) < l.every {
		return false
	}
	if len(l.last) >= logLimiterPrune {
		for c, t := range l.last {
			if now.Sub(t) >= l.every {
				delete(l.last, c)
			}
		}
	}
	l.last[cause] = now
	return true
}

// refuse records and (rate-limited) logs a connection refused before any
// request, then closes it.
func (p *Proxy) refuse(c net.Conn, direction, reason string, attrs ...any) {
	c.Close()
	if p.metrics != nil {
		p.metrics.refused.WithLabelValues(direction, reason).Inc()
	}
	if p.logLimit.allow(direction + "/" + reason) {
		p.log.Warn("connection refused", append([]any{"direction", direction, "reason", reason, "peer", c.RemoteAddr().String()}, attrs...)...)
	}
}
