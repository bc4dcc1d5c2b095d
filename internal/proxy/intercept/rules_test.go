package intercept

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRules(t *testing.T) {
	got := Rules(RuleConfig{InboundPort: 15006, OutboundPort: 15001, ExcludeInboundPorts: []int{15000}})
	var lines []string
	for _, r := range got {
		lines = append(lines, strings.Join(r, " "))
	}
	want := []string{
		"-t nat -N TRELLIS_INBOUND",
		"-t nat -A TRELLIS_INBOUND -p tcp --dport 15006 -j RETURN",
		"-t nat -A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN",
		"-t nat -A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 15006",
		"-t nat -A PREROUTING -p tcp -j TRELLIS_INBOUND",
		"-t nat -N TRELLIS_OUTPUT",
		"-t nat -A TRELLIS_OUTPUT -m mark --mark 1337 -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -o lo -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
		"-t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT",
	}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Fatalf("rules (-want +got):\n%s", diff)
	}
}

// The rules Kubernetes injection installs: the proxy runs without
// capabilities, so its user is exempt rather than its sockets' mark, and
// annotations leave ports out.
func TestRulesForAnUnprivilegedProxy(t *testing.T) {
	got := Rules(RuleConfig{InboundPort: 15006, OutboundPort: 15001, ExcludeInboundPorts: []int{15020}, ExcludeOutboundPorts: []int{5432}, ProxyUID: 1337})
	var lines []string
	for _, r := range got {
		lines = append(lines, strings.Join(r, " "))
	}
	want := []string{
		"-t nat -N TRELLIS_INBOUND",
		"-t nat -A TRELLIS_INBOUND -p tcp --dport 15006 -j RETURN",
		"-t nat -A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN",
		"-t nat -A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 15006",
		"-t nat -A PREROUTING -p tcp -j TRELLIS_INBOUND",
		"-t nat -N TRELLIS_OUTPUT",
		"-t nat -A TRELLIS_OUTPUT -m mark --mark 1337 -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -o lo -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
		"-t nat -A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
		"-t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT",
	}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Fatalf("rules (-want +got):\n%s", diff)
	}
}
