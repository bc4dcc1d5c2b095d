package proxy

import (
	"net/http"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// TestTap: a tap reports the requests its filter selects — with source,
// decision and status, the path without its query — at most at its rate,
// and nothing once stopped.
func TestTap(t *testing.T) {
	iss := newIssuer(t)
	in := freeAddr(t)
	orders := startProxy(t, ordersConfig(in, serveApp(t, answer("orders")), config.ProtocolHTTP), iss.holderFor(ordersID))
	out := freeAddr(t)
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
		Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}), iss.holderFor(checkoutID))
	client := &http.Client{Timeout: 10 * time.Second}

	orders.StartTap(7, TapFilter{Method: "GET", PathPrefix: "/v1/", MaxPerSecond: 2})
	for _, path := range []string{"/v1/orders?token=secret", "/other", "/v1/a", "/v1/b", "/v1/c"} {
		if code, _ := getBody(t, client, "http://"+out+path); code != 200 {
			t.Fatalf("GET %s = %d", path, code)
		}
	}
	var got []TapEvent
	for len(got) < 2 {
		select {
		case ev := <-orders.TapEvents():
			got = append(got, ev)
		case <-time.After(5 * time.Second):
			t.Fatalf("tap events: %+v, want 2", got)
		}
	}
	ev := got[0]
	if ev.Tap != 7 || ev.Path != "/v1/orders" || ev.Method != "GET" || ev.Status != 200 || ev.Direction != "inbound" ||
		ev.Source != checkoutID || !ev.TLS || ev.Decision != "allow" {
		t.Fatalf("event = %+v", ev)
	}
	if got[1].Path != "/v1/a" {
		t.Fatalf("second event %+v, want /v1/a (/other does not match)", got[1])
	}
	// The rate (2/s, a burst of 2) dropped the rest.
	select {
	case ev := <-orders.TapEvents():
		t.Fatalf("an event beyond the tap's rate: %+v", ev)
	default:
	}
	// Stopped, the hub takes nothing; its fast path says so.
	orders.StopTap(7)
	if orders.tap.tapped() {
		t.Fatal("a tap is still active after StopTap")
	}
	orders.tap.publish(TapEvent{Time: time.Now(), Method: "GET", Path: "/v1/d"})
	select {
	case ev := <-orders.TapEvents():
		t.Fatalf("an event after the tap stopped: %+v", ev)
	default:
	}
}
