package localnet

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestNetnsName(t *testing.T) {
	for _, tc := range []struct {
		name string
		seq  int
		want string
	}{
		{"shipping-orders-api-0", 1, "trl1a2b-shipping-orders-api-0-1"},
		{"Shipping/Orders_API.0", 2, "trl1a2b-shipping-orders-api-0-2"},
		{"--a..b--", 3, "trl1a2b-a-b-3"},
		{"___", 4, "trl1a2b-host-4"},
		{strings.Repeat("abcdefghi-", 6), 5, "trl1a2b-abcdefghi-abcdefghi-abcdefghi-abcdefghi-5"},
	} {
		if got := netnsName("trl1a2b", tc.name, tc.seq); got != tc.want {
			t.Errorf("netnsName(%q, %d) = %q, want %q", tc.name, tc.seq, got, tc.want)
		}
	}
}

// Interface names must fit in 15 bytes for the longest prefix and the
// largest host number.
func TestLinkNamesFit(t *testing.T) {
	p := strings.Repeat("p", maxPrefixLen)
	if err := validatePrefix(p); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{bridgeName(p), vethName(p, maxHosts)} {
		if len(name) > 15 {
			t.Errorf("%q is %d bytes, over the 15-byte interface name limit", name, len(name))
		}
	}
}

func TestValidatePrefix(t *testing.T) {
	for p, ok := range map[string]bool{
		"trl1a2b":   true,
		"a":         true,
		"":          false,
		"1trl":      false,
		"trl-1":     false,
		"TRL":       false,
		"trl1a2b3c": false,
	} {
		if err := validatePrefix(p); (err == nil) != ok {
			t.Errorf("validatePrefix(%q) = %v, want ok=%v", p, err, ok)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg     Config
		wantErr string
	}{
		{Config{Prefix: "trl1"}, ""},
		{Config{Prefix: "trl1", Subnet: netip.MustParsePrefix("10.0.0.0/31")}, "/30 or larger"},
		{Config{Prefix: "trl1", Subnet: netip.MustParsePrefix("fd00::/64")}, "IPv4"},
		{Config{Prefix: "trl1", ServiceRange: netip.MustParsePrefix("198.18.5.0/24")}, "overlaps"},
		{Config{Prefix: "trl-1"}, "prefix"},
	} {
		err := tc.cfg.withDefaults().Validate()
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%+v: Validate() = %v, want error containing %q", tc.cfg, err, tc.wantErr)
		}
	}
}

func TestNextFree(t *testing.T) {
	a := netip.MustParseAddr
	p30 := netip.MustParsePrefix("10.0.0.0/30") // .1 bridge, .2 the only host, .3 broadcast
	for _, tc := range []struct {
		subnet netip.Prefix
		used   []string
		want   string // "" for none
	}{
		{netip.MustParsePrefix("198.18.0.0/16"), nil, "198.18.0.2"},
		{netip.MustParsePrefix("198.18.0.0/16"), []string{"198.18.0.2", "198.18.0.4"}, "198.18.0.3"},
		{netip.MustParsePrefix("198.18.0.0/16"), []string{"198.18.0.2", "198.18.0.3"}, "198.18.0.4"},
		{p30, nil, "10.0.0.2"},
		{p30, []string{"10.0.0.2"}, ""},
	} {
		used := map[netip.Addr]bool{}
		for _, u := range tc.used {
			used[a(u)] = true
		}
		got, ok := nextFree(tc.subnet, used)
		if tc.want == "" {
			if ok {
				t.Errorf("nextFree(%s, %v) = %s, want none", tc.subnet, tc.used, got)
			}
			continue
		}
		if !ok || got != a(tc.want) {
			t.Errorf("nextFree(%s, %v) = %s %v, want %s", tc.subnet, tc.used, got, ok, tc.want)
		}
	}
	if got := lastAddr(netip.MustParsePrefix("198.18.0.0/15")); got != a("198.19.255.255") {
		t.Errorf("lastAddr = %s", got)
	}
}

func TestHostPrefixesParsing(t *testing.T) {
	routes := `default via 10.0.0.1 dev eth0 proto dhcp src 10.0.0.5 metric 100
10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.5
10.9.9.9 dev tun0 scope link
blackhole 192.168.50.0/24
198.18.0.0/16 dev trl1-br proto kernel scope link src 198.18.0.1 linkdown
`
	addrs := `1: lo    inet 127.0.0.1/8 scope host lo\       valid_lft forever preferred_lft forever
4: eth0    inet 172.16.3.7/20 brd 172.16.15.255 scope global noprefixroute eth0\       valid_lft forever preferred_lft forever
`
	p := netip.MustParsePrefix
	got := append(parseRoutes(routes), parseAddrs(addrs)...)
	want := []netip.Prefix{p("10.0.0.0/24"), p("10.9.9.9/32"), p("192.168.50.0/24"), p("198.18.0.0/16"), p("127.0.0.0/8"), p("172.16.0.0/20")}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Fatalf("prefixes (-want +got):\n%s", diff)
	}
	for _, tc := range []struct {
		subnet string
		want   string
	}{
		{"198.18.0.0/16", "198.18.0.0/16"},
		{"198.18.7.0/24", "198.18.0.0/16"},
		{"172.16.2.0/24", "172.16.0.0/20"},
		{"198.20.0.0/16", ""},
	} {
		o, ok := firstOverlap(p(tc.subnet), got)
		if tc.want == "" && ok || tc.want != "" && o != p(tc.want) {
			t.Errorf("firstOverlap(%s) = %s %v, want %q", tc.subnet, o, ok, tc.want)
		}
	}
}

func TestParseNames(t *testing.T) {
	netns := "trl1-a-1 (id: 1)\ntrl1-b-2 (id: 0)\nother\n"
	if diff := cmp.Diff([]string{"trl1-a-1", "trl1-b-2", "other"}, parseNetns(netns)); diff != "" {
		t.Errorf("netns (-want +got):\n%s", diff)
	}
	links := `1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
5: trl1-br: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\    link/ether 02:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff
6: trl1-v1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master trl1-br state UP mode DEFAULT group default qlen 1000\    link/ether 3a:1f:00:00:00:01 brd ff:ff:ff:ff:ff:ff link-netns trl1-a-1
`
	got := parseLinks(links)
	if diff := cmp.Diff([]string{"lo", "trl1-br", "trl1-v1"}, got); diff != "" {
		t.Errorf("links (-want +got):\n%s", diff)
	}
	var mine []string
	for _, n := range append(got, "trl12-br", "trl1") {
		if owned("trl1", n) {
			mine = append(mine, n)
		}
	}
	if diff := cmp.Diff([]string{"trl1-br", "trl1-v1"}, mine); diff != "" {
		t.Errorf("owned by trl1 (-want +got):\n%s", diff)
	}
}

func TestHostsFile(t *testing.T) {
	got := string(hostsFile("checkout-0", netip.MustParseAddr("198.18.0.2"), map[string]netip.Addr{
		"orders-api.shipping":               netip.MustParseAddr("198.19.0.10"),
		"checkout-0":                        netip.MustParseAddr("198.19.0.99"),
		"billing.default.svc.cluster.local": netip.MustParseAddr("::ffff:198.19.0.11"),
	}))
	want := `# Written by trellis for checkout-0; rewritten when services change.
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
198.18.0.2	checkout-0
198.19.0.11	billing.default.svc.cluster.local
198.19.0.10	orders-api.shipping
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("hosts file (-want +got):\n%s", diff)
	}
	for name, ok := range map[string]bool{
		"orders-api.shipping": true, "svc_1": true, "a b": false, "x#y": false, "a\nb": false, "": false, "-x": false, ".x": false, "a..b": false,
	} {
		if validHostname(name) != ok {
			t.Errorf("validHostname(%q) = %v, want %v", name, !ok, ok)
		}
	}
}
