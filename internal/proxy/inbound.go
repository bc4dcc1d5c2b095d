package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/meshmetrics"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/sniff"
)

// peekConn is an accepted connection whose first bytes have been peeked at.
// It carries what the proxy learned about it to the HTTP servers.
type peekConn struct {
	net.Conn
	r    *bufio.Reader
	meta *connMeta
}

func (c *peekConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// metaConn carries connMeta on a connection whose TLS the proxy has already
// terminated. It deliberately hides the *tls.Conn from net/http: HTTP inside
// mesh mTLS is served like h2c (prior-knowledge HTTP/2 or HTTP/1.1), because
// the mesh ALPN names are not ones net/http knows.
type metaConn struct {
	net.Conn
	meta *connMeta
}

// unwrapConn returns the connection a wrapper relays to.
func unwrapConn(c net.Conn) net.Conn {
	switch w := c.(type) {
	case *peekConn:
		return w.Conn
	case *metaConn:
		return w.Conn
	}
	return nil
}

// connMeta is what a request handler needs to know about its connection.
type connMeta struct {
	direction string // "inbound" or "outbound"
	appPort   uint32
	protocol  config.Protocol
	appAddr   string
	// peer is filled for inbound connections.
	peer      string // principal without spiffe://, "" when plaintext
	peerNS    string
	peerIP    netip.Addr
	tls       bool
	target    outboundTarget // outbound only
	tlsLabel  string
	peerLabel string
	// expiry closes a mesh connection when the peer's certificate expires:
	// the handshake proved an identity only for the certificate's lifetime.
	expiry *time.Timer
}

// stopExpiry releases the expiry timer of a connection that has ended.
func (m *connMeta) stopExpiry() {
	if m != nil && m.expiry != nil {
		m.expiry.Stop()
	}
}

type metaKey struct{}

func metaFrom(ctx context.Context) *connMeta {
	m, _ := ctx.Value(metaKey{}).(*connMeta)
	return m
}

// peek reads until the first bytes are classified, the buffer is full, or
// the deadline passes; nothing is consumed. A TLS ClientHello is read whole
// (within the buffer) so that its ALPN can route the connection.
func peek(r *bufio.Reader, c net.Conn, timeout time.Duration) (sniff.Kind, []byte) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	for n := 1; ; {
		b, err := r.Peek(n)
		k := sniff.Classify(b)
		switch k {
		case sniff.TLS:
			if _, perr := sniff.ParseClientHello(b); !errors.Is(perr, sniff.ErrNeedMore) {
				return k, b
			}
		case sniff.Unknown:
		default:
			return k, b
		}
		if err != nil || n >= r.Size() {
			return k, b
		}
		// Take whatever has arrived, and wait for at least one more byte.
		n = min(max(len(b)+1, r.Buffered()), r.Size())
	}
}

// handleInbound classifies a connection to the workload and applies the
// port's mTLS mode before anything reaches the application.
//
// appAddr is where allowed traffic goes: the application's port on AppHost
// for a listener of its own, and for intercepted traffic the address the
// caller dialled — never loopback, which would expose ports the application
// bound to 127.0.0.1 on purpose.
func (p *Proxy) handleInbound(c net.Conn, in config.Inbound, appAddr string) {
	if !p.waitReady() {
		p.refuse(c, "inbound", "no certificate yet")
		return
	}
	st := p.policies.Load()
	mode := st.ports.Mode(in.AppPort)
	r := bufio.NewReaderSize(c, 4096)
	timeout := firstBytesTimeout
	if in.Protocol == config.ProtocolServerFirst || in.Protocol == config.ProtocolSniff {
		// A server-first client says nothing until the app greets it; a
		// mesh peer's ClientHello is immediate.
		timeout = sniffTimeout
	}
	kind, first := peek(r, c, timeout)
	if kind == sniff.TLS && len(first) >= r.Size() {
		if _, err := sniff.ParseClientHello(first); errors.Is(err, sniff.ErrNeedMore) {
			p.refuse(c, "inbound", "TLS ClientHello larger than the 4 KiB the proxy reads", "port", in.AppPort)
			return
		}
	}
	remote, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	meta := &connMeta{direction: "inbound", appPort: in.AppPort, protocol: in.Protocol, peerIP: remote.Addr().Unmap(), appAddr: appAddr}
	pc := &peekConn{Conn: c, r: r, meta: meta}

	if kind == sniff.Unknown && len(first) == 0 && timeout == firstBytesTimeout {
		p.refuse(c, "inbound", "peer sent nothing", "port", in.AppPort)
		return
	}
	if kind == sniff.TLS {
		ch, err := sniff.ParseClientHello(first)
		if err == nil && isMeshALPN(ch.ALPN) {
			if mode == policy.ModeDisable {
				p.refuse(c, "inbound", "mesh mTLS to a DISABLE port", "port", in.AppPort)
				return
			}
			p.serveMesh(pc)
			return
		}
		// The application's own TLS (or a malformed hello): opaque bytes.
	}
	if mode == policy.ModeStrict {
		p.refuse(c, "inbound", meshmetrics.RefusedStrictPlaintext, "port", in.AppPort, "sniffed", kind.String())
		return
	}
	meta.tlsLabel, meta.peerLabel = "false", meshmetrics.Unknown
	if !p.admitted(c, meta) {
		return
	}
	if (kind == sniff.HTTP1 || kind == sniff.HTTP2) && in.Protocol != config.ProtocolTCP && in.Protocol != config.ProtocolServerFirst ||
		in.Protocol.IsHTTP() && kind != sniff.TLS {
		p.inboundConns.push(pc)
		return
	}
	p.serveInboundTCP(pc, meta)
}

// admitted records what connection c turned out to be and checks, against
// the policies in force now, that its port's mode admits it. Reading the
// mode after recording closes the window in which a switch to STRICT
// (whose reload closes every recorded connection it no longer admits)
// could miss a connection still being classified.
func (p *Proxy) admitted(c net.Conn, m *connMeta) bool {
	p.describe(c, m)
	if mode := p.policies.Load().ports.Mode(m.appPort); !mtls.Admits(mode, m.tls) {
		p.refuse(c, "inbound", fmt.Sprintf("the port is now %s", mode), "port", m.appPort)
		return false
	}
	return true
}

// serveMesh completes the mTLS handshake and dispatches on ALPN.
func (p *Proxy) serveMesh(pc *peekConn) {
	tc := tls.Server(pc, p.serverTLS())
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		p.refuse(pc, "inbound", handshakeFailure(err), "err", err.Error())
		return
	}
	state := tc.ConnectionState()
	id, err := peerPrincipal(state)
	if err != nil {
		p.refuse(tc, "inbound", "peer certificate has no SPIFFE ID", "err", err.Error())
		return
	}
	m := pc.meta
	m.expiry = time.AfterFunc(state.PeerCertificates[0].NotAfter.Sub(p.opts.Now()), func() {
		if p.logLimit.allow("peer-expired/" + id.String()) {
			p.log.Warn("closing a mesh connection: the peer's certificate expired", "peer", id.String())
		}
		tc.Close()
	})
	m.tls, m.tlsLabel = true, "true"
	m.peer = strings.TrimPrefix(id.String(), "spiffe://")
	m.peerLabel = id.String()
	m.peerNS = meshid.NamespaceOf(m.peer)
	if !p.admitted(pc.Conn, m) {
		m.stopExpiry()
		return
	}
	switch state.NegotiatedProtocol {
	case ALPNHTTP2, ALPNHTTP1:
		if m.protocol == config.ProtocolTCP || m.protocol == config.ProtocolServerFirst {
			m.stopExpiry()
			p.refuse(tc, "inbound", "HTTP over mTLS to a TCP port", "port", m.appPort)
			return
		}
		p.inboundConns.push(&metaConn{Conn: tc, meta: m})
	case ALPNTCP:
		p.serveInboundTCP(&metaConn{Conn: tc, meta: m}, m)
		m.stopExpiry()
	default:
		m.stopExpiry()
		p.refuse(tc, "inbound", "no mesh ALPN negotiated")
	}
}

// handshakeFailure names why a peer's handshake failed, so that logs (one
// line per cause) and metrics tell an attack from a misconfiguration.
func handshakeFailure(err error) string {
	var unknownCA x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	msg := err.Error()
	switch {
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return "expired or not yet valid client certificate"
	case errors.As(err, &unknownCA):
		return "client certificate from an unknown CA"
	case strings.Contains(msg, "no X.509 bundle found"):
		return "client certificate from another trust domain"
	case strings.Contains(msg, "didn't provide a certificate"):
		return "no client certificate"
	case errors.Is(err, context.DeadlineExceeded):
		return "handshake timed out"
	default:
		return "mTLS handshake failed"
	}
}

// serveInboundTCP authorizes an opaque TCP connection once and relays it to
// the application.
func (p *Proxy) serveInboundTCP(pc net.Conn, m *connMeta) {
	req := authz.Request{HTTP: false, Port: m.appPort, Principal: m.peer, Namespace: m.peerNS, IP: m.peerIP}
	res := p.policies.Load().authz.Evaluate(&req)
	decision, policyRef := decisionOf(res)
	p.reportDecision(res, m)
	if p.metrics != nil {
		p.metrics.connections.WithLabelValues("inbound", m.peerLabel, p.selfLabel(), m.tlsLabel, decision, policyRef).Inc()
	}
	if !res.Allowed {
		p.refuse(pc, "inbound", "denied by authorization", "policy", policyRef, "peer", m.peerLabel, "port", m.appPort)
		return
	}
	up, err := p.dialer.Dial("tcp", m.appAddr)
	if err != nil {
		p.refuse(pc, "inbound", "application unreachable", "app", m.appAddr, "err", err.Error())
		return
	}
	p.relay(pc, up, "inbound", m.peerLabel, p.selfLabel(), m.tlsLabel)
}

// decisionOf names the decision and the responsible policy for metrics.
func decisionOf(res authz.Result) (decision, policyRef string) {
	decision = "allow"
	if !res.Allowed {
		decision = "deny"
	}
	policyRef = ""
	if res.Policy != nil {
		policyRef = res.Policy.Ref
	}
	return decision, policyRef
}

func (p *Proxy) selfLabel() string {
	if svid := p.opts.Identity.Current(); svid != nil {
		return svid.ID.String()
	}
	return "unknown"
}

// buildServers creates the two HTTP servers the proxy feeds classified
// connections to: inbound (plaintext callers and mesh peers alike, after
// the proxy has terminated their mTLS) and outbound (the application).
func (p *Proxy) buildServers() {
	p.inboundConns = newChanListener("inbound")
	p.outboundConns = newChanListener("outbound")

	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	connMetaCtx := func(ctx context.Context, c net.Conn) context.Context {
		switch c := c.(type) {
		case *peekConn:
			return context.WithValue(ctx, metaKey{}, c.meta)
		case *metaConn:
			return context.WithValue(ctx, metaKey{}, c.meta)
		}
		return ctx
	}
	newServer := func(h http.HandlerFunc) *http.Server {
		return &http.Server{
			Handler:           h,
			Protocols:         protocols,
			ConnContext:       connMetaCtx,
			ReadHeaderTimeout: firstBytesTimeout,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          httpErrorLog(p.log),
			IdleTimeout:       idleTimeout,
			HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: 1000},
		}
	}
	p.inboundHTTP = newServer(p.serveInboundHTTP)
	p.inboundHTTP.ConnState = func(c net.Conn, state http.ConnState) {
		if mc, ok := c.(*metaConn); ok && state == http.StateClosed {
			mc.meta.stopExpiry()
		}
	}
	p.outboundHTTP = newServer(p.serveOutboundHTTP)
	p.gatewayHTTP = p.gatewayServer()
}

// serveInboundHTTP authorizes one request and forwards it to the application.
func (p *Proxy) serveInboundHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	m := metaFrom(r.Context())
	if m == nil {
		http.Error(w, "trellis: internal error: connection without metadata", http.StatusInternalServerError)
		return
	}
	st := p.policies.Load()
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	decision, policyRef := "deny", ""
	defer func() {
		if p.metrics != nil {
			p.metrics.requests.WithLabelValues("inbound", m.peerLabel, p.selfLabel(), m.tlsLabel, decision, policyRef, statusClass(rec.status)).Inc()
			p.metrics.duration.WithLabelValues("inbound", m.peerLabel, p.selfLabel(), m.tlsLabel).Observe(time.Since(start).Seconds())
		}
		if p.tap.tapped() {
			p.tap.publish(TapEvent{Time: start, Direction: "inbound", Source: m.peerLabel, Destination: p.selfLabel(), Authority: r.Host,
				Method: r.Method, Path: r.URL.Path, Status: rec.status, Latency: time.Since(start), TLS: m.tls, Decision: decision, Policy: policyRef})
		}
	}()
	// The mode may have changed since the connection was accepted: a
	// keep-alive connection must not carry plaintext past a switch to
	// STRICT.
	if mode := st.ports.Mode(m.appPort); !mtls.Admits(mode, m.tls) {
		rec.Header().Set("Connection", "close")
		http.Error(rec, fmt.Sprintf("trellis: port %d is now %s; reconnect", m.appPort, mode), http.StatusForbidden)
		policyRef = "mtls"
		return
	}
	// Authorize and forward one and the same path.
	path, err := NormalizePath(r.URL.EscapedPath())
	if err != nil {
		http.Error(rec, "trellis: bad request path: "+err.Error(), http.StatusBadRequest)
		policyRef = "invalid-path"
		return
	}
	if path != r.URL.EscapedPath() {
		if r.URL.Path, err = url.PathUnescape(path); err != nil {
			http.Error(rec, "trellis: bad request path", http.StatusBadRequest)
			return
		}
		r.URL.RawPath = path
	}
	req := authz.Request{
		HTTP: true, Port: m.appPort, Principal: m.peer, Namespace: m.peerNS, IP: m.peerIP,
		Method: r.Method, Path: path, Host: r.Host, Headers: r.Header,
	}
	res := st.authz.Evaluate(&req)
	decision, policyRef = decisionOf(res)
	p.reportDecision(res, m)
	if !res.Allowed {
		denied(rec, res, m)
		return
	}
	transport := p.appHTTP1
	if m.protocol == config.ProtocolHTTP2 || m.protocol == config.ProtocolGRPC ||
		m.protocol == config.ProtocolSniff && (r.ProtoMajor == 2 && !m.tls || strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")) {
		// gRPC is HTTP/2 only; over the mesh every request arrives as
		// HTTP/2, so only its content type tells.
		transport = p.appH2C
	}
	guardBody(w, r)
	forward(rec, r, "http", m.appAddr, transport, p.log, "the application")
}

// reportDecision counts the decision by the policy rule that made it, and
// records what dry-run policies would have decided and which AUDIT policy
// matched: metrics for every request, and a log line per policy and
// minute, so a policy can be tried before it is enforced.
func (p *Proxy) reportDecision(res authz.Result, m *connMeta) {
	if p.metrics != nil {
		p.metrics.rules.WithLabelValues(ruleLabels(res.Policy, res.Rule, res.Allowed, false)...).Inc()
		if res.DryRun.Evaluated {
			p.metrics.rules.WithLabelValues(ruleLabels(res.DryRun.Policy, res.DryRun.Rule, res.DryRun.Allowed, true)...).Inc()
		}
	}
	if res.DryRun.Evaluated && res.DryRun.Allowed != res.Allowed {
		would := "allow"
		if !res.DryRun.Allowed {
			would = "deny"
		}
		ref := ""
		if res.DryRun.Policy != nil {
			ref = res.DryRun.Policy.Ref
		}
		if p.metrics != nil {
			p.metrics.dryRun.WithLabelValues(ref, would).Inc()
		}
		if p.logLimit.allow("dry-run/" + ref + "/" + would) {
			p.log.Info("dry-run policy would change the decision", "policy", ref, "wouldBe", would, "peer", m.peerLabel, "port", m.appPort)
		}
	}
	if res.Audit != nil && p.logLimit.allow("audit/"+res.Audit.Ref) {
		p.log.Info("AUDIT policy matched", "policy", res.Audit.Ref, "rule", res.AuditRule, "peer", m.peerLabel, "port", m.appPort)
	}
}

// ruleLabels are the labels of trellis_authz_decisions_total: the policy
// and rule (empty when none decided), the decision, and whether it is a
// dry-run's would-be decision.
func ruleLabels(pol *authz.Policy, rule int, allowed, dryRun bool) []string {
	ref, r := "", ""
	if pol != nil {
		ref = pol.Ref
		if rule >= 0 {
			r = strconv.Itoa(rule)
		}
	}
	decision := "deny"
	if allowed {
		decision = "allow"
	}
	return []string{ref, r, decision, strconv.FormatBool(dryRun)}
}

// denied answers a request authorization refused: 403, the policy in a
// header for tools, and a body for humans.
func denied(w http.ResponseWriter, res authz.Result, m *connMeta) {
	by := "no matching ALLOW policy"
	if res.Policy != nil {
		by = res.Policy.Ref
	}
	caller := "a plaintext caller"
	if m.peer != "" {
		caller = m.peer
	}
	w.Header().Set("X-Trellis-Denied-By", by)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusForbidden)
	if res.Policy != nil {
		fmt.Fprintf(w, "RBAC: access denied: %s policy %s rule %d refused %s\n", res.Policy.Action, by, res.Rule, caller)
		return
	}
	fmt.Fprintf(w, "RBAC: access denied: no ALLOW policy matched %s\n", caller)
}
