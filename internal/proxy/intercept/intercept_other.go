//go:build !linux

package intercept

import (
	"net"
	"net/netip"
	"syscall"
)

func get(*net.TCPConn) (netip.AddrPort, bool, error) { return netip.AddrPort{}, false, ErrUnsupported }

// MarkControl fails: there is no transparent interception here.
func MarkControl(_, _ string, _ syscall.RawConn) error { return ErrUnsupported }
