package localnet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// HostSpec describes a workload replica's network namespace.
type HostSpec struct {
	// Name is unique within the network, e.g. "shipping-orders-api-0";
	// the namespace's hosts file maps it to the host's address.
	Name string
	// Hosts are extra /etc/hosts entries inside the namespace, name → IP:
	// service names and their virtual IPs.
	Hosts map[string]netip.Addr
	// Intercept installs the sidecar's interception rules; nil for a
	// workload without a sidecar.
	Intercept *intercept.RuleConfig
}

// Host is a network namespace attached to the bridge.
type Host struct {
	// Name is HostSpec.Name.
	Name string
	// Netns is the namespace's name for `ip netns`: <prefix>-<name>-<n>,
	// the name sanitized and truncated.
	Netns string
	// Addr is the address of the namespace's eth0.
	Addr netip.Addr

	veth string // host end of the veth pair, in the bridge

	mu sync.Mutex // serializes hosts file writes
}

// innerLink is the namespace's end of the veth pair: the name applications
// expect, and one no other namespace's link can clash with.
const innerLink = "eth0"

// AddHost creates a network namespace for a workload replica: the next free
// address of the subnet on eth0, a veth pair to the bridge, lo up, a route
// for the service range, a hosts file, and the interception rules (with
// iptables and ip6tables, so IPv6 cannot go around the sidecar). The
// namespace has no default route: the host's address and every other host
// are on-link, and nothing should leave the machine.
//
// It is all or nothing: on failure, what it created is removed again.
func (n *Network) AddHost(spec HostSpec) (*Host, error) {
	h, err := n.addHost(spec)
	if err != nil {
		return nil, fmt.Errorf("localnet: add host %q: %w", spec.Name, err)
	}
	return h, nil
}

func (n *Network) addHost(spec HostSpec) (*Host, error) {
	if !validHostname(spec.Name) {
		return nil, errors.New("name: want a host name (letters, digits, '-', '.', '_')")
	}
	if err := validateHosts(spec.Hosts); err != nil {
		return nil, err
	}
	if ic := spec.Intercept; ic != nil {
		for _, p := range append([]int{ic.InboundPort, ic.OutboundPort}, ic.ExcludeInboundPorts...) {
			if p < 1 || p > 65535 {
				return nil, fmt.Errorf("intercept: port %d out of range", p)
			}
		}
	}

	h, err := n.reserve(spec.Name)
	if err != nil {
		return nil, err
	}
	var undo []func() error
	fail := func(err error) (*Host, error) {
		errs := []error{err}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				errs = append(errs, fmt.Errorf("undo: %w", uerr))
			}
		}
		n.release(h, len(errs) == 1)
		return nil, errors.Join(errs...)
	}

	if err := run("ip", "netns", "add", h.Netns); err != nil {
		return fail(err)
	}
	undo = append(undo, func() error { return delNetns(h.Netns) })

	// Written before anything runs in the namespace: `ip netns exec`
	// bind-mounts it over /etc/hosts at each exec.
	undo = append(undo, func() error { return delEtcDir(h.Netns) })
	if err := os.MkdirAll(filepath.Dir(h.hostsPath()), 0o755); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(h.hostsPath(), hostsFile(h.Name, h.Addr, spec.Hosts), 0o644); err != nil {
		return fail(err)
	}

	if err := run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", innerLink, "netns", h.Netns); err != nil {
		return fail(err)
	}
	undo = append(undo, func() error { return delLink(h.veth) })

	in := func(args ...string) []string { return append([]string{"ip", "-n", h.Netns}, args...) }
	steps := [][]string{
		{"ip", "link", "set", h.veth, "master", n.bridge},
		{"ip", "link", "set", h.veth, "up"},
		in("addr", "add", netip.PrefixFrom(h.Addr, n.cfg.Subnet.Bits()).String(), "dev", innerLink),
		in("link", "set", innerLink, "up"),
		in("link", "set", "lo", "up"),
		// The subnet's route comes with the address. Service virtual IPs
		// need one for connect() to get as far as the OUTPUT chain, where
		// the sidecar's rule redirects them. Without a sidecar, nothing
		// answers ARP for them: connect() fails with "no route to host"
		// after about 3 s, not after minutes of SYN retries.
		in("route", "add", n.cfg.ServiceRange.String(), "dev", innerLink),
	}
	if ic := spec.Intercept; ic != nil {
		for _, tool := range []string{"iptables", "ip6tables"} {
			for _, rule := range intercept.Rules(*ic) {
				// -w: legacy iptables takes a lock shared by all namespaces;
				// wait for it rather than fail when hosts are added in parallel.
				steps = append(steps, append([]string{"ip", "netns", "exec", h.Netns, tool, "-w", "5"}, rule...))
			}
		}
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return fail(err)
		}
	}

	n.mu.Lock()
	closed := n.closed
	if !closed {
		n.hosts[h] = true
	}
	n.mu.Unlock()
	if closed {
		return fail(errors.New("network closed"))
	}
	n.log.Info("host added", "name", h.Name, "netns", h.Netns, "addr", h.Addr, "intercept", spec.Intercept != nil)
	return h, nil
}

// reserve allocates a name number and an address for a host being created.
func (n *Network) reserve(name string) (*Host, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, errors.New("network closed")
	}
	if n.names[name] {
		return nil, errors.New("a host with this name exists already")
	}
	if n.seq >= maxHosts {
		return nil, fmt.Errorf("more than %d hosts added to this network", maxHosts)
	}
	addr, ok := nextFree(n.cfg.Subnet, n.reserved)
	if !ok {
		return nil, fmt.Errorf("no free address left in %s", n.cfg.Subnet)
	}
	n.seq++
	n.reserved[addr] = true
	n.names[name] = true
	return &Host{
		Name:  name,
		Netns: netnsName(n.cfg.Prefix, name, n.seq),
		Addr:  addr,
		veth:  vethName(n.cfg.Prefix, n.seq),
	}, nil
}

// release gives back a host's name and, if its links are gone, its address.
func (n *Network) release(h *Host, addrFree bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.names, h.Name)
	if addrFree {
		delete(n.reserved, h.Addr)
	}
}

// RemoveHost removes a host's namespace, veth and hosts file, for a replica
// that is gone for good; the name can be added again. Removing a host
// twice, or after Close, does nothing. Stop the processes in the namespace
// first: they keep it alive, without a network.
func (n *Network) RemoveHost(h *Host) error {
	n.mu.Lock()
	ok := n.hosts[h]
	delete(n.hosts, h)
	n.mu.Unlock()
	if !ok {
		return nil
	}
	err := h.remove()
	// An address whose veth may still be in the bridge is not reused.
	n.release(h, err == nil)
	if err != nil {
		return fmt.Errorf("localnet: remove host %q: %w", h.Name, err)
	}
	n.log.Info("host removed", "name", h.Name, "netns", h.Netns)
	return nil
}

// remove deletes the veth first: deleting a namespace in which processes
// still run only removes its name, and its links would stay in the bridge.
func (h *Host) remove() error {
	return errors.Join(delLink(h.veth), delNetns(h.Netns), delEtcDir(h.Netns))
}

func (h *Host) hostsPath() string { return filepath.Join(netnsEtcDir, h.Netns, "hosts") }

// Command returns a command that runs name inside the host's namespace,
// with its hosts file as /etc/hosts; callers set Stdout, Stderr, Env and
// Dir. `ip netns exec` execs name in place, so the process the Cmd starts,
// waits for and kills when ctx ends is the command itself.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.Netns, name}, args...)...)
}

// SetHosts replaces the extra hosts file entries (the host's own name
// stays), for services added after the host.
//
// The file is rewritten in place, not replaced by a rename: each process
// started by `ip netns exec` has it bind-mounted over /etc/hosts, which pins
// the inode, so only an in-place write reaches processes already running.
// A lookup at the instant of the write can see a short file.
func (h *Host) SetHosts(entries map[string]netip.Addr) error {
	if err := validateHosts(entries); err != nil {
		return fmt.Errorf("localnet: hosts of %q: %w", h.Name, err)
	}
	data := hostsFile(h.Name, h.Addr, entries)
	h.mu.Lock()
	defer h.mu.Unlock()
	// No O_CREATE: after RemoveHost or Close there is nothing to update.
	f, err := os.OpenFile(h.hostsPath(), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("localnet: hosts of %q: %w", h.Name, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("localnet: hosts of %q: %w", h.Name, err)
	}
	return nil
}

// String is the host's name and address, for logs.
func (h *Host) String() string { return h.Name + " (" + h.Addr.String() + ", netns " + h.Netns + ")" }
