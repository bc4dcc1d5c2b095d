package proxy

import (
	"io"
	"net/http"
	"testing"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// BenchmarkTwoHopHTTP measures one HTTP request through an outbound and an
// inbound sidecar (mTLS between them) to a local application; with
// -cpuprofile it shows where the proxy spends its time. bench/run-proxies
// measures the same path with fortio against nginx and HAProxy.
func BenchmarkTwoHopHTTP(b *testing.B) {
	iss := newIssuer(b)
	app := serveApp(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello from the backend, 37 bytes long")
	}))
	in, out := freeAddr(b), freeAddr(b)
	startProxy(b, ordersConfig(in, app, config.ProtocolHTTP), iss.holderFor(ordersID))
	startProxy(b, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}), iss.holderFor("spiffe://cluster.local/ns/default/sa/checkout"))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	url := "http://" + out + "/"
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}
