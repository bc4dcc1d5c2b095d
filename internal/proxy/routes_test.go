package proxy

import (
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// describeRoute renders a route as "service protocol [addr=identity…]".
func describeRoute(rt *route) string {
	if rt == nil {
		return ""
	}
	var eps []string
	for _, ep := range rt.endpoints {
		eps = append(eps, ep.addr+"="+strings.TrimPrefix(ep.id.String(), "spiffe://cluster.local/ns/"))
	}
	return fmt.Sprintf("%s %s [%s]", rt.service, rt.protocol, strings.Join(eps, " "))
}

// tableView is what a routing table decides, in comparable form.
type tableView struct {
	ByAddr    map[string]string
	Listeners []string
}

func viewOf(t *routeTable) tableView {
	v := tableView{ByAddr: map[string]string{}}
	for a, rt := range t.byAddr {
		v.ByAddr[a.String()] = describeRoute(rt)
	}
	for _, rt := range t.listeners {
		v.Listeners = append(v.Listeners, describeRoute(rt))
	}
	return v
}

func TestBuildTable(t *testing.T) {
	const (
		orders   = "spiffe://cluster.local/ns/shipping/sa/orders-api"
		payments = "spiffe://cluster.local/ns/shipping/sa/payments"
	)
	ep := func(addr, id string) []config.Endpoint { return []config.Endpoint{{Address: addr, Identity: id}} }
	staticOrders := config.Outbound{Listen: "127.0.0.1:15001", Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: ep("10.0.0.1:15006", orders)}
	staticPayments := config.Outbound{Addresses: []string{"198.18.0.2:80"}, Service: "payments.shipping", Protocol: config.ProtocolTCP, Endpoints: ep("10.0.0.2:15006", payments)}
	for _, tc := range []struct {
		name    string
		static  []config.Outbound
		pushed  []config.Outbound
		want    tableView
		wantErr string
	}{
		{
			name:   "static configuration alone",
			static: []config.Outbound{staticOrders, staticPayments},
			want: tableView{
				ByAddr: map[string]string{
					"198.18.0.2:80":  "payments.shipping tcp [10.0.0.2:15006=shipping/sa/payments]",
					"10.0.0.1:15006": "orders-api.shipping http [10.0.0.1:15006=shipping/sa/orders-api]",
					"10.0.0.2:15006": "payments.shipping tcp [10.0.0.2:15006=shipping/sa/payments]",
				},
				Listeners: []string{"orders-api.shipping http [10.0.0.1:15006=shipping/sa/orders-api]", ""},
			},
		},
		{
			name:   "a pushed destination replaces the static entry and its listener follows; the other static entry stays",
			static: []config.Outbound{staticOrders, staticPayments},
			pushed: []config.Outbound{{Addresses: []string{"198.18.0.1:80"}, Service: "orders-api.shipping", Protocol: "grpc", Endpoints: ep("10.0.0.3:15006", orders)}},
			want: tableView{
				ByAddr: map[string]string{
					"198.18.0.1:80":  "orders-api.shipping grpc [10.0.0.3:15006=shipping/sa/orders-api]",
					"198.18.0.2:80":  "payments.shipping tcp [10.0.0.2:15006=shipping/sa/payments]",
					"10.0.0.3:15006": "orders-api.shipping grpc [10.0.0.3:15006=shipping/sa/orders-api]",
					"10.0.0.2:15006": "payments.shipping tcp [10.0.0.2:15006=shipping/sa/payments]",
				},
				Listeners: []string{"orders-api.shipping grpc [10.0.0.3:15006=shipping/sa/orders-api]", ""},
			},
		},
		{
			name:   "a listener follows the pushed destination of its port",
			static: []config.Outbound{{Listen: "127.0.0.1:15001", Service: "orders-api.shipping", Port: 9090}},
			pushed: []config.Outbound{
				{Service: "orders-api.shipping", Port: 80, Protocol: "http", Endpoints: ep("10.0.0.1:8080", orders)},
				{Service: "orders-api.shipping", Port: 9090, Protocol: "grpc-web", Endpoints: ep("10.0.0.1:9090", orders)},
			},
			want: tableView{
				ByAddr: map[string]string{
					"10.0.0.1:8080": "orders-api.shipping http [10.0.0.1:8080=shipping/sa/orders-api]",
					"10.0.0.1:9090": "orders-api.shipping grpc [10.0.0.1:9090=shipping/sa/orders-api]",
				},
				Listeners: []string{"orders-api.shipping grpc [10.0.0.1:9090=shipping/sa/orders-api]"},
			},
		},
		{
			name:   "no endpoints",
			static: []config.Outbound{{Listen: "127.0.0.1:15001", Service: "orders-api.shipping"}},
			pushed: []config.Outbound{{Service: "orders-api.shipping", Addresses: []string{"198.18.0.1:80"}}},
			want: tableView{
				ByAddr:    map[string]string{"198.18.0.1:80": "orders-api.shipping  []"},
				Listeners: []string{"orders-api.shipping  []"},
			},
		},
		{
			name:   "a listener without a port and a service with several",
			static: []config.Outbound{{Listen: "127.0.0.1:15001", Service: "orders-api.shipping"}},
			pushed: []config.Outbound{
				{Service: "orders-api.shipping", Port: 80},
				{Service: "orders-api.shipping", Port: 9090},
			},
			wantErr: "proxy configuration outbound[0] names orders-api.shipping without a port, and the control plane sent its ports 80, 9090: set outbound[0].port",
		},
		{
			name:    "a service sent twice without ports",
			pushed:  []config.Outbound{{Service: "orders-api.shipping"}, {Service: "orders-api.shipping"}},
			wantErr: "destinations[0].port: orders-api.shipping is sent 2 times; each of its destinations needs its service port",
		},
		{
			name:    "a service port sent twice",
			pushed:  []config.Outbound{{Service: "orders-api.shipping", Port: 80}, {Service: "orders-api.shipping", Port: 80}},
			wantErr: "destinations[1]: orders-api.shipping port 80 is also destinations[0]",
		},
		{
			name:    "a pushed listener",
			pushed:  []config.Outbound{{Listen: "127.0.0.1:15001", Service: "orders-api.shipping"}},
			wantErr: `destinations[0].listen: "127.0.0.1:15001": listeners come from the proxy configuration only`,
		},
		{
			name:    "a pushed address a static entry has",
			static:  []config.Outbound{staticPayments},
			pushed:  []config.Outbound{{Service: "orders-api.shipping", Addresses: []string{"198.18.0.2:80"}}},
			wantErr: "proxy configuration outbound[0].addresses[0]: 198.18.0.2:80 is also destinations[0].addresses[0]",
		},
		{
			name:    "a pushed endpoint with another identity than the static configuration gives it",
			static:  []config.Outbound{staticPayments},
			pushed:  []config.Outbound{{Service: "orders-api.shipping", Endpoints: ep("10.0.0.2:15006", orders)}},
			wantErr: "proxy configuration outbound[0].endpoints[0].identity: 10.0.0.2:15006 is also listed with identity " + orders,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tbl, err := buildTable(tc.static, tc.pushed, nil, &meshTransport{}, &net.Dialer{}, slog.New(slog.DiscardHandler))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, viewOf(tbl)); diff != "" {
				t.Errorf("table (-want +got):\n%s", diff)
			}
		})
	}
}

// TestBuildTableDoesNotModifyItsInput: protocols are normalized in the
// table, not in the caller's destinations.
func TestBuildTableDoesNotModifyItsInput(t *testing.T) {
	pushed := []config.Outbound{{Service: "orders-api.shipping", Protocol: "mysql"}}
	if _, err := buildTable(nil, pushed, nil, &meshTransport{}, &net.Dialer{}, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	if pushed[0].Protocol != "mysql" {
		t.Fatalf("the caller's destination was changed to %q", pushed[0].Protocol)
	}
}

// TestPeersCarryOver: an endpoint whose address and identity stay the
// same keeps its connection pool across tables; one that changes identity
// or goes away is retired.
func TestPeersCarryOver(t *testing.T) {
	const orders, payments = "spiffe://cluster.local/ns/shipping/sa/orders-api", "spiffe://cluster.local/ns/shipping/sa/payments"
	mt := &meshTransport{}
	build := func(prev *routeTable, eps ...config.Endpoint) *routeTable {
		t.Helper()
		tbl, err := buildTable(nil, []config.Outbound{{Service: "orders-api.shipping", Endpoints: eps}}, prev, mt, &net.Dialer{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return tbl
	}
	a, b := config.Endpoint{Address: "10.0.0.1:15006", Identity: orders}, config.Endpoint{Address: "10.0.0.2:15006", Identity: orders}
	t1 := build(nil, a, b)
	t2 := build(t1, a, config.Endpoint{Address: b.Address, Identity: payments})
	if t2.peers[a.Address] != t1.peers[a.Address] {
		t.Error("an unchanged endpoint got a new peer: the update would reconnect to it")
	}
	if t2.peers[b.Address] == t1.peers[b.Address] {
		t.Error("an endpoint with a new identity kept its peer: connections verified against the old identity would be reused")
	}
	if got := retiredPeers(t1, t2); len(got) != 1 || got[0] != t1.peers[b.Address] {
		t.Errorf("retired %v, want the old peer of %s", got, b.Address)
	}
	t3 := build(t2, a)
	if got := retiredPeers(t2, t3); len(got) != 1 || got[0] != t2.peers[b.Address] {
		t.Errorf("retired %v, want the peer of the removed %s", got, b.Address)
	}
}

// FuzzBuildTable: whatever destinations the control plane sends, building
// the table either fails with an error or yields a table in which the
// static listener has a route — never a panic (routes are built by
// functions that trust validation).
func FuzzBuildTable(f *testing.F) {
	f.Add("orders-api.shipping", uint32(80), "http", "198.18.0.1:80", "10.0.0.1:15006", "spiffe://cluster.local/ns/shipping/sa/orders-api")
	f.Add("orders-api.shipping", uint32(0), "mysql", "[::ffff:10.0.0.1]:15006", "[fe80::1%eth0]:1", "spiffe://td/x")
	f.Fuzz(func(t *testing.T, service string, port uint32, protocol, addr, epAddr, id string) {
		static := []config.Outbound{{Listen: "127.0.0.1:15001", Service: "orders-api.shipping"}}
		pushed := []config.Outbound{
			{Service: service, Port: port, Protocol: config.Protocol(protocol), Addresses: []string{addr}, Endpoints: []config.Endpoint{{Address: epAddr, Identity: id}}},
			{Service: "payments.shipping", Endpoints: []config.Endpoint{{Address: "10.0.0.1:15006", Identity: "spiffe://cluster.local/ns/shipping/sa/payments"}}},
		}
		tbl, err := buildTable(static, pushed, nil, &meshTransport{}, &net.Dialer{}, slog.New(slog.DiscardHandler))
		if err != nil {
			return
		}
		if tbl.listeners[0] == nil {
			t.Fatal("the static listener has no route")
		}
	})
}
