package intercept

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// RuleConfig says what the interception rules redirect where.
type RuleConfig struct {
	// InboundPort receives every TCP connection arriving for the workload.
	InboundPort int
	// OutboundPort receives every TCP connection the workload opens.
	OutboundPort int
	// ExcludeInboundPorts reach the network namespace unredirected: the
	// proxy's admin port, for health checks from outside.
	ExcludeInboundPorts []int
	// ExcludeOutboundPorts leave the workload unredirected.
	ExcludeOutboundPorts []int
	// ProxyUID, when not zero, is the proxy's user, whose connections are
	// not redirected (besides those carrying BypassMark): a proxy without
	// CAP_NET_ADMIN cannot mark its sockets.
	ProxyUID int
}

// Chains created by Rules; Cleanup removes them.
const (
	InboundChain  = "TRELLIS_INBOUND"
	OutboundChain = "TRELLIS_OUTPUT"
)

// Rules returns the iptables commands (arguments after "iptables") that a
// Kubernetes init container would run in a workload's network namespace —
// once with iptables and once with ip6tables, which take the same rules, so
// that IPv6 traffic cannot go around the sidecar:
// all inbound TCP to the proxy's inbound port, all outbound TCP to its
// outbound port, except the proxy's own connections (socket mark
// BypassMark) and traffic that stays on loopback.
func Rules(c RuleConfig) [][]string {
	in, out := strconv.Itoa(c.InboundPort), strconv.Itoa(c.OutboundPort)
	rules := [][]string{
		{"-t", "nat", "-N", InboundChain},
		{"-t", "nat", "-A", InboundChain, "-p", "tcp", "--dport", in, "-j", "RETURN"},
	}
	for _, p := range c.ExcludeInboundPorts {
		rules = append(rules, []string{"-t", "nat", "-A", InboundChain, "-p", "tcp", "--dport", strconv.Itoa(p), "-j", "RETURN"})
	}
	rules = append(rules,
		[]string{"-t", "nat", "-A", InboundChain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", in},
		[]string{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", InboundChain},

		[]string{"-t", "nat", "-N", OutboundChain},
		// The proxy's own connections: to peers, to the app, passthrough.
		[]string{"-t", "nat", "-A", OutboundChain, "-m", "mark", "--mark", strconv.Itoa(BypassMark), "-j", "RETURN"},
	)
	if c.ProxyUID != 0 {
		rules = append(rules, []string{"-t", "nat", "-A", OutboundChain, "-m", "owner", "--uid-owner", strconv.Itoa(c.ProxyUID), "-j", "RETURN"})
	}
	// Loopback stays local (the proxy's admin port, app-to-itself).
	rules = append(rules, []string{"-t", "nat", "-A", OutboundChain, "-o", "lo", "-j", "RETURN"})
	for _, p := range c.ExcludeOutboundPorts {
		rules = append(rules, []string{"-t", "nat", "-A", OutboundChain, "-p", "tcp", "--dport", strconv.Itoa(p), "-j", "RETURN"})
	}
	return append(rules,
		[]string{"-t", "nat", "-A", OutboundChain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", out},
		[]string{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OutboundChain},
	)
}

// Cleanup returns the iptables commands that undo Rules; each may fail
// harmlessly when its rule is already gone.
func Cleanup() [][]string {
	return [][]string{
		{"-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", InboundChain},
		{"-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", OutboundChain},
		{"-t", "nat", "-F", InboundChain},
		{"-t", "nat", "-X", InboundChain},
		{"-t", "nat", "-F", OutboundChain},
		{"-t", "nat", "-X", OutboundChain},
	}
}

// Install runs Rules in the current network namespace, with iptables and
// then ip6tables, after Cleanup (an init container that runs again finds
// its rules in place). It is what Kubernetes injection's init container
// does. A namespace without IPv6 gets the IPv4 rules only.
func Install(c RuleConfig) error {
	tools := []string{"iptables", "ip6tables"}
	// Without IPv6 in the namespace there is nothing to go around the
	// sidecar by, and ip6tables' NAT table may not exist.
	if _, err := os.Stat("/proc/net/if_inet6"); err != nil {
		tools = tools[:1]
	}
	for _, tool := range tools {
		for _, rule := range Cleanup() {
			_ = exec.Command(tool, append([]string{"-w", "5"}, rule...)...).Run()
		}
		for _, rule := range Rules(c) {
			args := append([]string{"-w", "5"}, rule...)
			if out, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
				return fmt.Errorf("%s %s: %v: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
		}
	}
	return nil
}

// ParsePorts parses a comma-separated list of port numbers ("3306, 6379"),
// as the exclusion flags and annotations give them.
func ParsePorts(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%q is not a port number (write port numbers separated by commas, such as \"3306,6379\")", f)
		}
		out = append(out, n)
	}
	return out, nil
}
