package localnet

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The pure part: names, addresses and the hosts file, decided from values.

func validatePrefix(p string) error {
	ok := len(p) >= 1 && len(p) <= maxPrefixLen && p[0] >= 'a' && p[0] <= 'z'
	for _, c := range []byte(p) {
		ok = ok && (c >= 'a' && c <= 'z' || c >= '0' && c <= '9')
	}
	if !ok {
		// No "-" inside: Cleanup matches "<prefix>-", which must not also
		// match the names of a mesh whose prefix extends this one.
		return fmt.Errorf("localnet: prefix %q: want 1 to %d lowercase letters and digits, starting with a letter", p, maxPrefixLen)
	}
	return nil
}

func bridgeName(prefix string) string { return prefix + "-br" }

// vethName names the host end of host number seq's veth pair; the inner end
// is eth0 in the namespace, where no other name can clash with it.
func vethName(prefix string, seq int) string { return prefix + "-v" + strconv.Itoa(seq) }

// maxNetnsLabel bounds the readable part of a namespace name, which becomes
// a file name under /run/netns and /etc/netns and shows in `ip netns list`.
const maxNetnsLabel = 40

// netnsName keeps the workload's name readable in `ip netns list`; the
// host number makes it unique even when sanitizing or truncating makes two
// names alike.
func netnsName(prefix, name string, seq int) string {
	var b strings.Builder
	dash := true // no leading dash
	for _, c := range strings.ToLower(name) {
		switch {
		case c >= 'a' && c <= 'z' || c >= '0' && c <= '9':
			b.WriteRune(c)
			dash = false
		case !dash:
			b.WriteByte('-')
			dash = true
		}
	}
	label := strings.TrimRight(b.String(), "-")
	if len(label) > maxNetnsLabel {
		label = strings.TrimRight(label[:maxNetnsLabel], "-")
	}
	if label == "" {
		label = "host"
	}
	return prefix + "-" + label + "-" + strconv.Itoa(seq)
}

// validHostname accepts what a hosts file can carry as one name: no
// whitespace or "#" that would change the line's meaning.
func validHostname(s string) bool {
	if s == "" || len(s) > 253 || s[0] == '-' || s[0] == '.' || strings.Contains(s, "..") {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

func validateHosts(entries map[string]netip.Addr) error {
	for name, addr := range entries {
		if !validHostname(name) {
			return fmt.Errorf("hosts entry %q: not a host name (letters, digits, '-', '.', '_')", name)
		}
		if !addr.IsValid() {
			return fmt.Errorf("hosts entry %q: no address", name)
		}
	}
	return nil
}

// hostsFile renders a namespace's /etc/hosts: localhost, the host's own
// name, then the entries sorted by name so that rewriting the same entries
// writes the same bytes.
func hostsFile(self string, addr netip.Addr, entries map[string]netip.Addr) []byte {
	var b strings.Builder
	b.WriteString("# Written by trellis for " + self + "; rewritten when services change.\n")
	b.WriteString("127.0.0.1\tlocalhost\n")
	b.WriteString("::1\tlocalhost ip6-localhost ip6-loopback\n")
	b.WriteString(addr.String() + "\t" + self + "\n")
	for _, name := range slices.Sorted(maps.Keys(entries)) {
		if name == self {
			continue // the host's own address wins
		}
		b.WriteString(entries[name].Unmap().String() + "\t" + name + "\n")
	}
	return []byte(b.String())
}

// nextFree returns the lowest address of subnet not in used, skipping the
// network address, the bridge's (the first) and the broadcast address.
func nextFree(subnet netip.Prefix, used map[netip.Addr]bool) (netip.Addr, bool) {
	last := lastAddr(subnet)
	for a := subnet.Addr().Next().Next(); a.IsValid() && a.Less(last); a = a.Next() {
		if !used[a] {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	return netip.AddrFrom4(b)
}

// firstOverlap returns the first of used that overlaps p. A default route
// overlaps everything and means nothing here, so it never counts.
func firstOverlap(p netip.Prefix, used []netip.Prefix) (netip.Prefix, bool) {
	for _, u := range used {
		if u.Bits() > 0 && u.Overlaps(p) {
			return u, true
		}
	}
	return netip.Prefix{}, false
}

// routeTypes are the words `ip route` prints before the destination of a
// route that is not unicast.
var routeTypes = map[string]bool{"unicast": true, "local": true, "broadcast": true, "multicast": true, "throw": true, "unreachable": true, "prohibit": true, "blackhole": true, "nat": true, "anycast": true}

// parseRoutes reads the destinations of `ip -4 route show` output.
func parseRoutes(out string) []netip.Prefix {
	var ps []netip.Prefix
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) > 1 && routeTypes[f[0]] {
			f = f[1:]
		}
		if len(f) == 0 {
			continue
		}
		if p, ok := parsePrefixOrAddr(f[0]); ok {
			ps = append(ps, p)
		}
	}
	return ps
}

// parseAddrs reads the prefixes of `ip -o -4 addr show` output, which
// covers addresses added with noprefixroute.
func parseAddrs(out string) []netip.Prefix {
	var ps []netip.Prefix
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "inet" {
				if p, err := netip.ParsePrefix(f[i+1]); err == nil {
					ps = append(ps, p.Masked())
				}
				break
			}
		}
	}
	return ps
}

func parsePrefixOrAddr(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), true
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}

// parseNetns reads the names of `ip netns list` output ("name (id: 3)").
func parseNetns(out string) []string {
	var names []string
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

// parseLinks reads the names of `ip -o link show` output
// ("7: trl1a2b-v1@if2: <...> ..."); a veth's name carries its peer after "@".
func parseLinks(out string) []string {
	var names []string
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name := strings.TrimSuffix(f[1], ":")
		name, _, _ = strings.Cut(name, "@")
		names = append(names, name)
	}
	return names
}

// owned reports whether a name was made by the network with this prefix.
func owned(prefix, name string) bool { return strings.HasPrefix(name, prefix+"-") }
