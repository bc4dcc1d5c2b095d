package proxy

import (
	"net"
	"net/netip"

	"github.com/trellis-mesh/trellis/internal/meshmetrics"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// handleTransparentInbound serves a connection iptables redirected from a
// workload port: the original destination port says which one.
func (p *Proxy) handleTransparentInbound(c net.Conn) {
	dst, redirected, err := intercept.Get(c)
	if err != nil {
		p.refuse(c, "inbound", "no original destination", "err", err.Error())
		return
	}
	if !redirected {
		// Someone dialled the capture port itself: there is no workload
		// port behind it, and forwarding would loop.
		p.refuse(c, "inbound", "direct connection to the inbound capture port")
		return
	}
	if out, err := netip.ParseAddrPort(p.opts.Config.Transparent.Outbound); err == nil && dst.Port() == out.Port() {
		// The outbound capture port on a dual-stack wildcard address is
		// reachable from outside; forwarding to it would let a remote
		// caller send traffic out as this workload.
		p.refuse(c, "inbound", "connection to the outbound capture port from outside")
		return
	}
	in, ok := p.inboundByPort[uint32(dst.Port())]
	if !ok {
		in = config.Inbound{AppPort: uint32(dst.Port()), Protocol: config.ProtocolSniff}
	}
	p.handleInbound(c, in, dst.String())
}

// handleTransparentOutbound serves a connection the application opened to
// any address: a known destination goes through the mesh, anything else
// passes through as plain TCP.
func (p *Proxy) handleTransparentOutbound(c net.Conn) {
	dst, redirected, err := intercept.Get(c)
	if err != nil {
		p.refuse(c, "outbound", "no original destination", "err", err.Error())
		return
	}
	if !redirected {
		// Only intercepted connections carry a destination; one made to
		// the capture port itself (or a marked proxy connection that came
		// back to it) has nowhere to go.
		p.refuse(c, "outbound", "direct connection to the outbound capture port")
		return
	}
	tbl := p.table.Load()
	if rt, ok := tbl.byAddr[dst]; ok {
		p.handleOutbound(c, rt, outboundTarget{listener: -1, dst: dst})
		return
	}
	if tbl.registryOnly {
		p.refuse(c, "outbound", refusedRegistryOnly, "dst", dst.String())
		return
	}
	p.passthrough(c, dst.String())
}

// passthrough relays a connection to a destination outside the mesh
// (host:port) unchanged.
func (p *Proxy) passthrough(c net.Conn, dst string) {
	up, err := p.dialer.Dial("tcp", dst)
	if err != nil {
		p.refuse(c, "outbound", "passthrough destination unreachable", "dst", dst, "err", err.Error())
		return
	}
	p.relayOutside(c, up)
}

// relayOutside relays the application's stream c to up, a plain
// connection to a destination outside the mesh.
func (p *Proxy) relayOutside(c, up net.Conn) {
	if p.metrics != nil {
		p.metrics.connections.WithLabelValues("outbound", p.selfLabel(), meshmetrics.Passthrough, "false", "allow", "").Inc()
	}
	p.relay(c, up, "outbound", p.selfLabel(), meshmetrics.Passthrough, "false")
}
