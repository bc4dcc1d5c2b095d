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

func get(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	var (
		dst    netip.AddrPort
		optErr error
	)
	err = raw.Control(func(fd uintptr) {
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
	if errors.Is(err, unix.ENOENT) {
		// Conntrack has no NAT entry: nothing rewrote the destination.
		if la, ok := c.LocalAddr().(*net.TCPAddr); ok {
			ap := la.AddrPort()
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
		}
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	return dst, nil
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
