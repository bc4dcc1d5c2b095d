package intercept

import "strconv"

// RuleConfig says what the interception rules redirect where.
type RuleConfig struct {
	// InboundPort receives every TCP connection arriving for the workload.
	InboundPort int
	// OutboundPort receives every TCP connection the workload opens.
	OutboundPort int
	// ExcludeInboundPorts reach the network namespace unredirected: the
	// proxy's admin port, for health checks from outside.
	ExcludeInboundPorts []int
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
		// Loopback stays local (the proxy's admin port, app-to-itself).
		[]string{"-t", "nat", "-A", OutboundChain, "-o", "lo", "-j", "RETURN"},
		[]string{"-t", "nat", "-A", OutboundChain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", out},
		[]string{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OutboundChain},
	)
	return rules
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
