// Package localnet is the local runtime's network: a bridge, one network
// namespace per workload replica with its sidecar beside it, the
// interception rules a Kubernetes init container would install, and name
// resolution through per-namespace hosts files. It lets `trellis up` run a
// whole mesh on one Linux machine with the same transparent interception a
// cluster has, without a container runtime.
//
// Everything is done by shelling out to ip, iptables and ip6tables, the
// tools an operator would use to inspect or repair the result by hand; the
// mesh does not depend on a netlink library. Every object created is named
// after Config.Prefix, so that Cleanup can find what a crashed run left.
package localnet

import (
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
)

// Default address ranges: 198.18.0.0/15 is reserved for benchmarking
// (RFC 2544), so nothing on a real network uses it and nothing routes it off
// the machine.
var (
	DefaultSubnet       = netip.MustParsePrefix("198.18.0.0/16")
	DefaultServiceRange = netip.MustParsePrefix("198.19.0.0/16")
)

// Sentinel errors for conditions a caller may act on.
var (
	// ErrPrefixInUse: objects named after the prefix exist already, left by
	// a crashed run (Cleanup removes them) or belonging to a running one.
	ErrPrefixInUse = errors.New("network prefix in use")
	// ErrSubnetInUse: the host already has an address or route overlapping
	// the subnet, most likely another mesh running with the default one.
	ErrSubnetInUse = errors.New("subnet in use")
)

// Config describes a local network.
type Config struct {
	// Prefix names everything this mesh creates (namespaces, links,
	// /etc/netns dirs), so that Cleanup(prefix) finds leftovers of a
	// crashed run. 1 to 8 lowercase letters and digits, starting with a
	// letter: Linux interface names are limited to 15 bytes and the
	// prefix is followed by "-" and a suffix.
	Prefix string
	// Subnet is where workload addresses come from; DefaultSubnet if
	// zero. The bridge (host side) takes the first address. IPv4 only.
	Subnet netip.Prefix
	// ServiceRange is where service virtual IPs live; DefaultServiceRange
	// if zero. It is routed into the bridge from every namespace so that an
	// application's connect() reaches the OUTPUT interception rule instead
	// of failing with "network unreachable".
	ServiceRange netip.Prefix
	Log          *slog.Logger
}

// maxPrefixLen keeps "<prefix>-v<n>" within the 15-byte interface name
// limit for up to maxHosts hosts.
const (
	maxPrefixLen = 8
	maxHosts     = 99999
)

func (c Config) withDefaults() Config {
	if !c.Subnet.IsValid() {
		c.Subnet = DefaultSubnet
	}
	if !c.ServiceRange.IsValid() {
		c.ServiceRange = DefaultServiceRange
	}
	c.Subnet = c.Subnet.Masked()
	c.ServiceRange = c.ServiceRange.Masked()
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first problem with a defaulted Config.
func (c Config) Validate() error {
	if err := validatePrefix(c.Prefix); err != nil {
		return err
	}
	if !c.Subnet.Addr().Is4() || c.Subnet.Bits() > 30 {
		return fmt.Errorf("localnet: subnet %s: want an IPv4 prefix of /30 or larger (e.g. %s)", c.Subnet, DefaultSubnet)
	}
	if !c.ServiceRange.Addr().Is4() {
		return fmt.Errorf("localnet: service range %s: want an IPv4 prefix (e.g. %s)", c.ServiceRange, DefaultServiceRange)
	}
	if c.Subnet.Overlaps(c.ServiceRange) {
		return fmt.Errorf("localnet: subnet %s overlaps service range %s: choose disjoint ranges", c.Subnet, c.ServiceRange)
	}
	return nil
}

// Network is a bridge in the host's network namespace and the hosts
// attached to it. Its methods are safe for concurrent use.
type Network struct {
	cfg    Config
	log    *slog.Logger
	bridge string
	host   netip.Addr

	mu       sync.Mutex
	closed   bool
	seq      int                 // last host number used in names; never reused
	reserved map[netip.Addr]bool // addresses of hosts, including ones being created
	names    map[string]bool     // HostSpec.Name of hosts, including ones being created
	hosts    map[*Host]bool
}

// Create creates the bridge <prefix>-br, up, with the first address of the
// subnet. Nothing else global changes: no NAT, no ip_forward, no route off
// the machine; the only route added to the host is the bridge's connected
// route for the subnet.
func Create(cfg Config) (*Network, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := &Network{
		cfg:      cfg,
		log:      cfg.Log,
		bridge:   bridgeName(cfg.Prefix),
		host:     cfg.Subnet.Addr().Next(),
		reserved: map[netip.Addr]bool{},
		names:    map[string]bool{},
		hosts:    map[*Host]bool{},
	}
	// Names are numbered from 1 in every network, so anything left with
	// this prefix would collide with what AddHost creates.
	if left, err := leftovers(cfg.Prefix); err != nil {
		return nil, fmt.Errorf("localnet: %w", err)
	} else if len(left) > 0 {
		return nil, fmt.Errorf("localnet: %s exists already (%w): another mesh with this prefix is running, or one stopped without cleaning up; if none is running, remove its leftovers with Cleanup(%q)", strings.Join(left, ", "), ErrPrefixInUse, cfg.Prefix)
	}
	if used, err := hostPrefixes(); err != nil {
		return nil, fmt.Errorf("localnet: %w", err)
	} else if p, ok := firstOverlap(cfg.Subnet, used); ok {
		return nil, fmt.Errorf("localnet: subnet %s overlaps %s, already on this machine (%w): another mesh may be running; choose another subnet", cfg.Subnet, p, ErrSubnetInUse)
	}
	// A bridge without an address of its own takes the lowest MAC of its
	// ports, so adding a host could change the MAC behind HostAddr and
	// break the other namespaces' ARP entries for it until they expire.
	mac, err := randomMAC()
	if err != nil {
		return nil, fmt.Errorf("localnet: %w", err)
	}
	steps := [][]string{
		{"ip", "link", "add", "name", n.bridge, "address", mac, "type", "bridge"},
		{"ip", "addr", "add", netip.PrefixFrom(n.host, cfg.Subnet.Bits()).String(), "dev", n.bridge},
		{"ip", "link", "set", n.bridge, "up"},
	}
	for i, s := range steps {
		if err := run(s...); err != nil {
			if i > 0 {
				_ = run("ip", "link", "del", n.bridge)
			}
			return nil, fmt.Errorf("localnet: create bridge: %w", err)
		}
	}
	n.log.Info("local network created", "bridge", n.bridge, "host_addr", n.host, "subnet", cfg.Subnet, "service_range", cfg.ServiceRange)
	n.warnFirewall()
	return n, nil
}

// HostAddr is the bridge's address: where processes in the namespaces reach
// the host, so the control plane listens there.
func (n *Network) HostAddr() netip.Addr { return n.host }

// Close removes every host (its namespace, and with it its iptables rules;
// its veth; its /etc/netns dir) and the bridge. It is best effort: it goes
// on after a failure and returns all of them joined. Calling it again does
// nothing. Processes still running in a namespace keep it alive, detached
// and without a network; stop them first.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	hosts := make([]*Host, 0, len(n.hosts))
	for h := range n.hosts {
		hosts = append(hosts, h)
	}
	clear(n.hosts)
	n.mu.Unlock()

	var errs []error
	for _, h := range hosts {
		errs = append(errs, h.remove())
	}
	errs = append(errs, delLink(n.bridge))
	err := errors.Join(errs...)
	if err != nil {
		n.log.Warn("local network removed with errors", "bridge", n.bridge, "err", err)
	} else {
		n.log.Info("local network removed", "bridge", n.bridge)
	}
	return err
}

// Available reports whether this process can create a local network: it
// needs Linux, CAP_NET_ADMIN and CAP_SYS_ADMIN (in practice, root) and the
// ip, iptables and ip6tables commands.
func Available() error {
	const fallback = "; trellis up runs each workload in a network namespace of its own: run it as root (sudo) on Linux"
	if runtime.GOOS != "linux" {
		return fmt.Errorf("network namespaces need Linux, this is %s%s", runtime.GOOS, fallback)
	}
	var missing []string
	if os.Geteuid() != 0 {
		caps, err := effectiveCaps()
		if err != nil {
			return fmt.Errorf("read capabilities: %w%s", err, fallback)
		}
		// CAP_NET_ADMIN (12) for links and iptables, CAP_SYS_ADMIN (21)
		// for the mounts behind `ip netns`.
		if caps&(1<<12) == 0 {
			missing = append(missing, "CAP_NET_ADMIN")
		}
		if caps&(1<<21) == 0 {
			missing = append(missing, "CAP_SYS_ADMIN")
		}
	}
	for _, tool := range []string{"ip", "iptables", "ip6tables"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, "the "+tool+" command")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("network namespaces need %s%s", strings.Join(missing, ", "), fallback)
	}
	return nil
}

func effectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff in /proc/self/status")
}

// warnFirewall points out host firewall settings that would silently drop
// the mesh's traffic, which Create does not change: with br_netfilter,
// bridged traffic between namespaces passes the FORWARD chain, whose
// policy Docker sets to DROP; traffic to HostAddr passes INPUT.
func (n *Network) warnFirewall() {
	if b, err := os.ReadFile("/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil && strings.TrimSpace(string(b)) == "1" {
		if out, err := output("iptables", "-S", "FORWARD"); err == nil && strings.Contains(out, "-P FORWARD DROP") {
			n.log.Warn("the host's iptables FORWARD policy is DROP and bridged traffic passes it: replicas may not reach each other; allow the bridge with `iptables -I FORWARD -i "+n.bridge+" -o "+n.bridge+" -j ACCEPT`", "bridge", n.bridge)
		}
	}
	if out, err := output("iptables", "-S", "INPUT"); err == nil && strings.Contains(out, "-P INPUT DROP") {
		n.log.Warn("the host's iptables INPUT policy is DROP: workloads may not reach the control plane at "+n.host.String()+"; allow it with `iptables -I INPUT -i "+n.bridge+" -j ACCEPT`", "bridge", n.bridge)
	}
}

func randomMAC() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	b[0] = b[0]&^1 | 2 // unicast, locally administered
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3], b[4], b[5]), nil
}
