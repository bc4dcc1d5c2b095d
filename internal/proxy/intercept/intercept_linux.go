package intercept

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// ip6tOriginalDst is IP6T_SO_ORIGINAL_DST, the IPv6 twin of SO_ORIGINAL_DST
// (same number, at level SOL_IPV6); x/sys/unix does not name it.
const ip6tOriginalDst = 80

func get(c *net.TCPConn) (netip.AddrPort, bool, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, false, fmt.Errorf("original destination: %w", err)
	}
	la, _ := c.LocalAddr().(*net.TCPAddr)
	// A dual-stack listener ([::]) gets IPv4 connections too; the family of
	// the connection, not of the socket, decides which option answers.
	ipv6 := la != nil && la.IP.To4() == nil
	var (
		dst    netip.AddrPort
		optErr error
	)
	err = raw.Control(func(fd uintptr) {
		if ipv6 {
			// A struct sockaddr_in6 (28 bytes) fits in IPv6MTUInfo.
			info, err := unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, ip6tOriginalDst)
			if err != nil {
				optErr = err
				return
			}
			// The kernel stores the port in network byte order.
			var b [2]byte
			binary.NativeEndian.PutUint16(b[:], info.Addr.Port)
			port := binary.BigEndian.Uint16(b[:])
			dst = netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), port)
			return
		}
		// SO_ORIGINAL_DST fills a struct sockaddr_in (16 bytes); the
		// 20-byte IPv6Mreq is the x/sys getter with room for it.
		mreq, err := unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
		if err != nil {
			optErr = err
			return
		}
		b := mreq.Multiaddr[:]
		port := binary.BigEndian.Uint16(b[2:4])
		dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port)
	})
	if err == nil {
		err = optErr
	}
	var local netip.AddrPort
	if la != nil {
		ap := la.AddrPort()
		local = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	if errors.Is(err, unix.ENOENT) && la != nil {
		// Conntrack has no entry at all: nothing rewrote the destination.
		return local, false, nil
	}
	if err != nil {
		return netip.AddrPort{}, false, fmt.Errorf("original destination: %w", err)
	}
	// With NAT rules installed every connection has a conntrack entry; one
	// that REDIRECT did not rewrite reports the address it was made to.
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	return dst, dst != local, nil
}

// MarkControl is a net.Dialer Control function that sets BypassMark on the
// socket; it needs CAP_NET_ADMIN, which a transparently intercepting proxy
// has.
func MarkControl(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, BypassMark)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("set socket mark %d (needs CAP_NET_ADMIN): %w", BypassMark, err)
	}
	return nil
}
