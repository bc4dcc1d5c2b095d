// Package intercept is the kernel side of transparent interception: it
// recovers where a connection was going before iptables REDIRECT sent it to
// the proxy (SO_ORIGINAL_DST), which is how a sidecar knows the destination
// the application dialled or the workload port a peer called; and it marks
// the proxy's own sockets so the interception rules let them pass.
package intercept

import (
	"errors"
	"net"
	"net/netip"
)

// ErrUnsupported is returned where the platform has no SO_ORIGINAL_DST.
var ErrUnsupported = errors.New("transparent interception needs Linux")

// BypassMark is the socket mark (SO_MARK) on every connection the proxy
// opens in transparent mode; the iptables rules return early for it, so
// the proxy's own traffic is not sent back to itself. 1337 is the uid Istio
// reserves for the same purpose, which makes the rules familiar to read.
const BypassMark = 1337

// Get returns the original destination of an accepted TCP connection and
// whether a REDIRECT rule rewrote it. A connection that was not redirected
// was made to the listener itself; its destination is its local address.
func Get(c net.Conn) (dst netip.AddrPort, redirected bool, err error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, false, errors.New("original destination: not a TCP connection")
	}
	return get(tc)
}
