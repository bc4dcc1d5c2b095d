package proxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// The HTTP proxy listener is outbound interception without the kernel's
// help: the application is pointed at it (HTTP_PROXY) and each request
// names where it goes — absolute form for plain HTTP, CONNECT for
// anything else. A mesh service's name (or virtual IP) goes through the
// mesh like an intercepted connection; any other destination passes
// through, as transparent interception lets it.

// handleHTTPProxy serves a connection to the HTTP proxy listener.
func (p *Proxy) handleHTTPProxy(c net.Conn) {
	if !p.waitReady() {
		p.refuse(c, "outbound", "no certificate yet")
		return
	}
	meta := &connMeta{direction: "outbound", protocol: config.ProtocolHTTP, target: outboundTarget{listener: -1, httpProxy: true}, tlsLabel: "true", peerLabel: p.selfLabel()}
	p.outboundConns.push(&peekConn{Conn: c, r: bufio.NewReaderSize(c, 4096), meta: meta})
}

// proxyRoute resolves a request to the HTTP proxy listener to its mesh
// route. Requests it answers itself — CONNECT, destinations outside the
// mesh, requests that name no destination — return nil.
func (p *Proxy) proxyRoute(w http.ResponseWriter, r *http.Request, tbl *routeTable) *route {
	if r.Method == http.MethodConnect {
		p.serveConnect(w, r, tbl)
		return nil
	}
	if r.URL.Host == "" {
		http.Error(w, "trellis: this is the sidecar's HTTP proxy port: a request must name its destination (http://host/path), as clients configured with HTTP_PROXY send it", http.StatusBadRequest)
		return nil
	}
	if r.URL.Scheme != "http" {
		http.Error(w, fmt.Sprintf("trellis: the HTTP proxy forwards http:// URLs, not %s:// (clients use CONNECT for https)", r.URL.Scheme), http.StatusBadRequest)
		return nil
	}
	hp, err := parseHostPort(r.URL.Host, 80)
	if err != nil {
		http.Error(w, "trellis: "+err.Error(), http.StatusBadRequest)
		return nil
	}
	if rt := tbl.lookupHost(hp); rt != nil {
		return rt
	}
	if p.isOwnListener(hp) {
		http.Error(w, "trellis: the request names the sidecar itself; it would loop", http.StatusLoopDetected)
		return nil
	}
	if tbl.registryOnly {
		p.refuseRequest(w, r.URL.Host)
		return nil
	}
	p.forwardOutside(w, r)
	return nil
}

// forwardOutside sends a plain HTTP request to a destination outside the
// mesh as it is, as transparent interception passes such traffic through.
func (p *Proxy) forwardOutside(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	guardBody(w, r)
	p.outsideProxy.ServeHTTP(rec, r)
	if p.metrics != nil {
		p.metrics.requests.WithLabelValues("outbound", p.selfLabel(), meshmetrics.Passthrough, "false", "", "", statusClass(rec.status)).Inc()
		p.metrics.duration.WithLabelValues("outbound", p.selfLabel(), meshmetrics.Passthrough, "false").Observe(time.Since(start).Seconds())
	}
	if p.tap.tapped() {
		p.tap.publish(TapEvent{Time: start, Direction: "outbound", Source: p.selfLabel(), Destination: meshmetrics.Passthrough, Authority: r.Host,
			Method: r.Method, Path: r.URL.Path, Status: rec.status, Latency: time.Since(start)})
	}
}

// newOutsideProxy returns the forwarder of plain HTTP requests to
// destinations outside the mesh, with connections of its own.
func newOutsideProxy(dialer *net.Dialer, p *Proxy) *httputil.ReverseProxy {
	transport := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     idleTimeout,
		// The application chose to send this request in plaintext; the
		// sidecar adds nothing, not even a proxy of its own.
		Proxy: nil,
	}
	return newForwarder("http", "", transport, p.log, func(r *http.Request) string { return r.URL.Host })
}

// serveConnect serves a CONNECT request: a tunnel to a mesh service goes
// over an mTLS stream to one of its endpoints, any other one to the
// destination directly. The reply waits for the connection, so a failure
// is an HTTP error the client can show rather than a closed tunnel.
func (p *Proxy) serveConnect(w http.ResponseWriter, r *http.Request, tbl *routeTable) {
	hp, err := parseHostPort(r.Host, 0)
	if err != nil {
		http.Error(w, "trellis: CONNECT "+err.Error(), http.StatusBadRequest)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "trellis: CONNECT needs HTTP/1.1", http.StatusMethodNotAllowed)
		return
	}
	var up net.Conn
	var ep *endpoint
	rt := tbl.lookupHost(hp)
	switch {
	case rt != nil:
		var rerr *routeError
		if up, ep, rerr = p.dialRoute(rt); rerr != nil {
			code := http.StatusBadGateway
			if len(rt.endpoints) == 0 {
				code = http.StatusServiceUnavailable
			}
			http.Error(w, fmt.Sprintf("trellis: %s unavailable: %v", rt.service, rerr), code)
			return
		}
	case p.isOwnListener(hp):
		http.Error(w, "trellis: the tunnel names the sidecar itself; it would loop", http.StatusLoopDetected)
		return
	case tbl.registryOnly:
		p.refuseRequest(w, r.Host)
		return
	default:
		if up, err = p.dialer.DialContext(r.Context(), "tcp", r.Host); err != nil {
			code, why := upstreamError(err)
			http.Error(w, fmt.Sprintf("trellis: %s unreachable: %s", r.Host, why), code)
			return
		}
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		up.Close()
		return
	}
	// The HTTP server forgets a hijacked connection: track it, so that
	// shutdown drains the tunnel like any relayed stream.
	if !p.track(c) {
		c.Close()
		up.Close()
		return
	}
	defer p.untrack(c)
	// The server's header deadline must not cut the tunnel.
	_ = c.SetDeadline(time.Time{})
	if _, err = brw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n"); err == nil {
		err = brw.Flush()
	}
	if err != nil {
		c.Close()
		up.Close()
		return
	}
	// Bytes the client sent after its request (a TLS ClientHello, say)
	// are in the server's reader.
	tunnel := &peekConn{Conn: c, r: brw.Reader, meta: metaFrom(r.Context())}
	if ep != nil {
		p.relayMesh(tunnel, up, ep, rt.tlsLabel())
		return
	}
	p.relayOutside(tunnel, up)
}

// lookupHost returns the mesh route a request names: a service by one of
// its host names or by its virtual IP.
func (t *routeTable) lookupHost(hp hostPort) *route {
	if a, err := netip.ParseAddr(hp.host); err == nil {
		return t.byAddr[netip.AddrPortFrom(a.Unmap(), uint16(hp.port))]
	}
	return t.byHost[hp]
}

// isOwnListener reports whether hp is one of the proxy's own listeners on
// this host, where forwarding would loop back into the proxy.
func (p *Proxy) isOwnListener(hp hostPort) bool {
	if hp.host != "localhost" {
		a, err := netip.ParseAddr(hp.host)
		if err != nil || !a.IsLoopback() && !a.IsUnspecified() {
			return false
		}
	}
	return p.listenPorts[hp.port]
}

// parseHostPort reads the destination of a proxy request: host[:port],
// with defaultPort when the port is left out (0: the port is required).
func parseHostPort(s string, defaultPort uint32) (hostPort, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil && defaultPort != 0 {
		host, portStr, err = net.SplitHostPort(net.JoinHostPort(strings.Trim(s, "[]"), strconv.Itoa(int(defaultPort))))
	}
	if err != nil {
		return hostPort{}, fmt.Errorf("%q is not host:port", s)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 || host == "" {
		return hostPort{}, fmt.Errorf("%q is not host:port", s)
	}
	return hostPort{host: strings.TrimSuffix(strings.ToLower(host), "."), port: uint32(port)}, nil
}

// refusedRegistryOnly is the refusal reason of traffic to a destination
// outside the registry under outboundTrafficPolicy REGISTRY_ONLY.
const refusedRegistryOnly = "not in the registry (REGISTRY_ONLY)"

// refuseRequest answers a request for a destination outside the registry
// under REGISTRY_ONLY, and counts it as a refusal.
func (p *Proxy) refuseRequest(w http.ResponseWriter, dst string) {
	if p.metrics != nil {
		p.metrics.refused.WithLabelValues("outbound", refusedRegistryOnly).Inc()
	}
	if p.logLimit.allow("outbound/" + refusedRegistryOnly) {
		p.log.Warn("request refused", "direction", "outbound", "reason", refusedRegistryOnly, "dst", dst)
	}
	http.Error(w, fmt.Sprintf("trellis: %s is neither a mesh service nor a ServiceEntry host, and the mesh's outboundTrafficPolicy is REGISTRY_ONLY: add a ServiceEntry for it", dst), http.StatusBadGateway)
}
