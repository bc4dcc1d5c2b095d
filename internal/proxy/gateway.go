package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/tlsfiles"
)

// An ingress gateway is a proxy without a workload beside it: it serves
// requests from outside the mesh on its listeners (plain HTTP, or HTTPS
// with a certificate from files) and sends each, by the HTTPRoutes the
// control plane pushes, to a mesh service over mutual TLS with its own
// identity — so callees see the gateway's and their policies can name it.

// GatewayRoute is one match of an HTTPRoute rule.
type GatewayRoute struct {
	Route     string   // the HTTPRoute, namespace/name
	Hostnames []string // any host when empty
	Path      string
	Exact     bool
	Service   string // name.namespace
	Port      uint32
}

// compileGatewayRoutes orders routes as the Gateway API ranks matches: a
// route naming the host before one for any host, then an exact path
// before a prefix, then the longer path; ties keep their order.
func compileGatewayRoutes(routes []GatewayRoute) []GatewayRoute {
	out := slices.Clone(routes)
	for i := range out {
		hosts := make([]string, len(out[i].Hostnames))
		for j, h := range out[i].Hostnames {
			hosts[j] = strings.ToLower(strings.TrimSuffix(h, "."))
		}
		out[i].Hostnames = hosts
	}
	slices.SortStableFunc(out, func(a, b GatewayRoute) int {
		return cmp.Or(
			cmp.Compare(boolInt(len(b.Hostnames) > 0), boolInt(len(a.Hostnames) > 0)),
			cmp.Compare(boolInt(b.Exact), boolInt(a.Exact)),
			cmp.Compare(len(b.Path), len(a.Path)))
	})
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// matches reports whether the route takes a request for host and path.
// A prefix matches whole path elements: /api matches /api and /api/x, not
// /apix.
func (r GatewayRoute) matches(host, path string) bool {
	if len(r.Hostnames) > 0 && !slices.Contains(r.Hostnames, host) {
		return false
	}
	if r.Exact {
		return path == r.Path
	}
	prefix := strings.TrimSuffix(r.Path, "/")
	return path == r.Path || prefix == "" || path == prefix || strings.HasPrefix(path, prefix+"/")
}

// serveGateway serves one request from outside the mesh.
func (p *Proxy) serveGateway(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	if !p.waitReady() {
		http.Error(w, "trellis gateway: no certificate yet; retry", http.StatusServiceUnavailable)
		return
	}
	// Route and forward one and the same path, normalized as the callee's
	// sidecar normalizes it: /public/../admin must not ride a /public
	// route to /admin.
	path, err := NormalizePath(r.URL.EscapedPath())
	if err != nil {
		http.Error(w, "trellis gateway: bad request path: "+err.Error(), http.StatusBadRequest)
		return
	}
	if path != r.URL.EscapedPath() {
		if r.URL.Path, err = url.PathUnescape(path); err != nil {
			http.Error(w, "trellis gateway: bad request path", http.StatusBadRequest)
			return
		}
		r.URL.RawPath = path
	}
	tbl := p.table.Load()
	host := strings.ToLower(r.Host)
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(host, ".")
	var route *GatewayRoute
	for i := range tbl.gateway {
		if tbl.gateway[i].matches(host, r.URL.Path) {
			route = &tbl.gateway[i]
			break
		}
	}
	if route == nil {
		http.Error(w, fmt.Sprintf("trellis gateway: no HTTPRoute for %s%s", host, r.URL.Path), http.StatusNotFound)
		return
	}
	rt := tbl.byHost[hostPort{route.Service, route.Port}]
	call := &outboundCall{route: rt}
	defer call.done()
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	switch {
	case rt == nil:
		http.Error(rec, fmt.Sprintf("trellis gateway: route %s sends to %s port %d, which the mesh does not have", route.Route, route.Service, route.Port), http.StatusServiceUnavailable)
	case len(rt.endpoints) == 0:
		http.Error(rec, fmt.Sprintf("trellis gateway: %s unavailable: it has no endpoints (no instance is ready)", rt.service), http.StatusServiceUnavailable)
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
		p.metrics.requests.WithLabelValues("outbound", p.selfLabel(), dest, "true", "", "", statusClass(rec.status)).Inc()
		p.metrics.duration.WithLabelValues("outbound", p.selfLabel(), dest, "true").Observe(time.Since(start).Seconds())
	}
	if p.tap.tapped() {
		dest := meshmetrics.Unreachable
		if call.used != nil {
			dest = call.used.label
		}
		p.tap.publish(TapEvent{Time: start, Direction: "outbound", Source: p.selfLabel(), Destination: dest, Authority: r.Host,
			Method: r.Method, Path: r.URL.Path, Status: rec.status, Latency: time.Since(start), TLS: true})
	}
}

// gatewayServer is the HTTP server of the gateway's listeners.
func (p *Proxy) gatewayServer() *http.Server {
	return &http.Server{
		Handler:           http.HandlerFunc(p.serveGateway),
		ReadHeaderTimeout: firstBytesTimeout,
		MaxHeaderBytes:    64 << 10,
		IdleTimeout:       idleTimeout,
		ErrorLog:          httpErrorLog(p.log),
	}
}

// gatewayListener wraps a listener of the gateway in TLS when it is
// HTTPS; its certificate files must be usable now.
func gatewayListener(l net.Listener, cfg config.GatewayListener, log *slog.Logger) (net.Listener, error) {
	if cfg.Protocol != "HTTPS" {
		return l, nil
	}
	// Read again when the files change, so a renewed certificate needs
	// no restart; files caught mid-rotation keep the previous one.
	cert := &tlsfiles.Reloader[*tls.Certificate]{
		Files: []string{cfg.Certificate, cfg.PrivateKey},
		Load: func(time.Time) (*tls.Certificate, error) {
			return tlsfiles.ServerCertificate(cfg.Certificate, cfg.PrivateKey)
		},
		Log: log.With("listener", cfg.Listen), What: "the gateway certificate:",
	}
	if _, err := cert.Get(time.Now()); err != nil {
		return nil, err
	}
	get := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert.Get(time.Now()) }
	return tls.NewListener(l, &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: get, NextProtos: []string{"http/1.1"}}), nil
}
