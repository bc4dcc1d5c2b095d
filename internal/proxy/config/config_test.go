package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const valid = `apiVersion: trellis.dev/v1
kind: ProxyConfig
workload: {namespace: shipping, name: orders-api, labels: {app: orders-api}}
inbound:
  - {listen: "127.0.0.1:16443", appPort: 8080, protocol: http}
outbound:
  - listen: 127.0.0.1:15080
    service: payments.shipping
    protocol: tcp
    endpoints:
      - {address: "127.0.0.1:17443", identity: "spiffe://cluster.local/ns/shipping/sa/payments"}
`

func write(t *testing.T, s string) string {
	p := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadValid(t *testing.T) {
	c, err := Load(write(t, valid), "")
	if err != nil {
		t.Fatal(err)
	}
	if c.AppHost != "127.0.0.1" || c.Inbound[0].AppPort != 8080 || c.Outbound[0].Endpoints[0].Identity == "" {
		t.Fatalf("loaded %+v", c)
	}
}

// A configuration without namespace (Kubernetes injection cannot know it
// offline) takes the proxy's; one naming another namespace is refused.
func TestLoadTakesTheProxysNamespace(t *testing.T) {
	noNS := "apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {name: orders}\ntransparent: {inbound: \"0.0.0.0:15006\", outbound: \"0.0.0.0:15001\", bypass: uid}\n"
	c, err := Load(write(t, noNS), "shipping")
	if err != nil {
		t.Fatal(err)
	}
	if c.Workload.Namespace != "shipping" || c.Transparent.MarksSockets() {
		t.Errorf("workload %+v, transparent %+v: want namespace shipping, bypass by uid", c.Workload, c.Transparent)
	}
	if _, err := Load(write(t, noNS), ""); err == nil || !strings.Contains(err.Error(), "workload.namespace") {
		t.Errorf("without --namespace: err = %v, want workload.namespace named", err)
	}
	other := strings.Replace(noNS, "{name: orders}", "{namespace: billing, name: orders}", 1)
	if _, err := Load(write(t, other), "shipping"); err == nil || !strings.Contains(err.Error(), `"billing", but the proxy's identity is of namespace "shipping"`) {
		t.Errorf("other namespace: err = %v", err)
	}
	bad := strings.Replace(noNS, "bypass: uid", "bypass: root", 1)
	if _, err := Load(write(t, bad), "shipping"); err == nil || !strings.Contains(err.Error(), "transparent.bypass") {
		t.Errorf("bad bypass: err = %v", err)
	}
}

func TestLoadErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct{ edit, want string }{
		{strings.Replace(valid, "appPort: 8080", "appPort: 0", 1), "inbound[0].appPort"},
		{strings.Replace(valid, "protocol: http}", "protocol: htp}", 1), `inbound[0].protocol: "htp"`},
		{strings.Replace(valid, "payments.shipping", "payments", 1), "outbound[0].service"},
		{strings.Replace(valid, "spiffe://cluster.local/ns/shipping/sa/payments", "cluster.local/ns/shipping/sa/payments", 1), "outbound[0].endpoints[0].identity"},
		{strings.Replace(valid, "127.0.0.1:15080", "127.0.0.1:16443", 1), "is also inbound[0].listen"},
		{strings.Replace(valid, "kind: ProxyConfig", "kind: Proxy", 1), "kind"},
		{valid + "extra: 1\n", "field extra not found"},
		{valid + "httpProxy: 127.0.0.1:15080\n", "outbound[0].listen: 127.0.0.1:15080 is also httpProxy"},
		{valid + "httpProxy: localhost:3128\n", "httpProxy: \"localhost:3128\" is not an ip:port"},
	} {
		_, err := Load(write(t, tc.edit), "")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("err = %v, want it to mention %q", err, tc.want)
		}
	}
}

// TestHTTPProxyAlone: an HTTP proxy listener is a proxy's whole
// outbound side, and its address is among the listeners.
func TestHTTPProxyAlone(t *testing.T) {
	c, err := Parse([]byte("apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {namespace: a, name: b}\nhttpProxy: 127.0.0.1:3128\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.ListenAddrs(); len(got) != 1 || got[0] != "127.0.0.1:3128" {
		t.Fatalf("ListenAddrs = %v", got)
	}
}

// TestOutboundWithoutEndpoints: a listener whose endpoints the control
// plane will send is a valid configuration.
func TestOutboundWithoutEndpoints(t *testing.T) {
	c, err := Parse([]byte(valid[:strings.Index(valid, "    endpoints:")]))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Outbound) != 1 || len(c.Outbound[0].Endpoints) != 0 {
		t.Fatalf("loaded %+v", c.Outbound)
	}
}

// TestValidateOutbound: destinations pushed by a control plane obey the
// rules of the file's outbound entries, with messages naming the field.
func TestValidateOutbound(t *testing.T) {
	const id = "spiffe://cluster.local/ns/shipping/sa/payments"
	field := func(i int) string { return fmt.Sprintf("destinations[%d]", i) }
	for _, tc := range []struct {
		name string
		outs []Outbound
		want string // "" for valid
	}{
		{"no endpoints", []Outbound{{Service: "payments.shipping", Addresses: []string{"198.18.0.1:80"}}}, ""},
		{"service", []Outbound{{Service: "payments"}}, `destinations[0].service: "payments" is not of the form name.namespace`},
		{"port", []Outbound{{Service: "payments.shipping", Port: 70000}}, "destinations[0].port: must be a port number"},
		{"protocol", []Outbound{{Service: "payments.shipping", Protocol: "htp"}}, `destinations[0].protocol: "htp" is not one of`},
		{"address", []Outbound{{Service: "payments.shipping", Addresses: []string{"payments:80"}}}, `destinations[0].addresses[0]: "payments:80" is not an ip:port address`},
		{"address twice, spelt differently", []Outbound{
			{Service: "payments.shipping", Addresses: []string{"198.18.0.1:80"}},
			{Service: "orders.shipping", Addresses: []string{"[::ffff:198.18.0.1]:80"}},
		}, "destinations[1].addresses[0]: [::ffff:198.18.0.1]:80 is also destinations[0].addresses[0]"},
		{"endpoint address", []Outbound{{Service: "payments.shipping", Endpoints: []Endpoint{{Address: "10.0.0.1", Identity: id}}}}, `destinations[0].endpoints[0].address: "10.0.0.1" is not an ip:port address`},
		{"identity", []Outbound{{Service: "payments.shipping", Endpoints: []Endpoint{{Address: "10.0.0.1:15006", Identity: "payments"}}}}, `destinations[0].endpoints[0].identity: "payments" is not a SPIFFE ID`},
		{"two identities", []Outbound{
			{Service: "payments.shipping", Endpoints: []Endpoint{{Address: "10.0.0.1:15006", Identity: id}}},
			{Service: "orders.shipping", Endpoints: []Endpoint{{Address: "10.0.0.1:15006", Identity: "spiffe://cluster.local/ns/shipping/sa/orders"}}},
		}, "destinations[1].endpoints[0].identity: 10.0.0.1:15006 is also listed with identity " + id},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateOutbound(tc.outs, field)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestKubernetesProtocolNamesAreAccepted(t *testing.T) {
	c, err := Load(write(t, strings.Replace(strings.Replace(valid, "protocol: http}", "protocol: kubernetes.io/h2c}", 1), "protocol: tcp", "protocol: mysql", 1)), "")
	if err != nil {
		t.Fatal(err)
	}
	if c.Inbound[0].Protocol != ProtocolHTTP2 || c.Outbound[0].Protocol != ProtocolServerFirst {
		t.Fatalf("protocols = %q, %q; want http2, server-first", c.Inbound[0].Protocol, c.Outbound[0].Protocol)
	}
}

func TestParseProtocol(t *testing.T) {
	for in, want := range map[string]Protocol{
		"http": ProtocolHTTP, "http-web": ProtocolHTTP, "grpc": ProtocolGRPC, "grpc-api": ProtocolGRPC,
		"kubernetes.io/h2c": ProtocolHTTP2, "tcp-redis": ProtocolTCP, "mysql": ProtocolServerFirst,
		"mysql-primary": ProtocolServerFirst, "metrics": ProtocolSniff, "": ProtocolSniff,
	} {
		if got := ParseProtocol(in); got != want {
			t.Errorf("ParseProtocol(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzParse: whatever bytes a configuration file holds, loading either
// fails with an error or yields a configuration that validates again.
func FuzzParse(f *testing.F) {
	f.Add([]byte(valid))
	f.Add([]byte("apiVersion: trellis.dev/v1\nkind: ProxyConfig\ntransparent: {inbound: \"[::]:15006\"}\n"))
	f.Add([]byte("inbound: [{listen: x, appPort: -1}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("a loaded configuration no longer validates: %v", err)
		}
	})
}
