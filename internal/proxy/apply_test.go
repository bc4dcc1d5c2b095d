package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

const checkoutID = "spiffe://cluster.local/ns/default/sa/checkout"

// answer serves the same text to every request, so a test can tell which
// backend a request reached.
func answer(text string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, text) })
}

// getBody sends GET url and returns the status and body; 0 when the request
// itself failed.
func getBody(t *testing.T, client *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Logf("GET %s: %v", url, err)
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// mustApply applies u and fails the test if the proxy refuses it.
func mustApply(t *testing.T, p *Proxy, u Update) {
	t.Helper()
	if err := p.Apply(u); err != nil {
		t.Fatalf("Apply %s: %v", u.Version, err)
	}
}

// parsePolicies parses policy YAML the way the control plane's policies
// arrive: validated.
func parsePolicies(t *testing.T, docs ...string) *policy.Set {
	t.Helper()
	set, err := policy.Parse("pushed.yaml", []byte(strings.Join(docs, "\n---\n")))
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// expectClosed checks that the proxy closes c instead of relaying it: a
// read ends with EOF or a reset, not a timeout.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "ping\n")
	n, err := c.Read(make([]byte, 16))
	var ne net.Error
	switch {
	case err == nil:
		t.Fatalf("read %d bytes from a connection the proxy should have closed", n)
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatal("the connection stayed open")
	}
}

// rawGet sends a keep-alive GET on an open connection and returns the
// response's status and body.
func rawGet(t *testing.T, c net.Conn, br *bufio.Reader) (int, string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: orders-api\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestApplyAddsDestination starts the caller with listeners for two
// services and no endpoints (as a sidecar that follows a control plane
// does): requests get 503 and streams are closed, until an update brings
// the endpoints. A keep-alive connection opened before the update follows
// it.
func TestApplyAddsDestination(t *testing.T) {
	iss := newIssuer(t)
	httpIn, tcpIn := freeAddr(t), freeAddr(t)
	serverCfg := ordersConfig(httpIn, serveApp(t, answer("orders")), config.ProtocolHTTP)
	serverCfg.Inbound = append(serverCfg.Inbound, config.Inbound{Listen: tcpIn, AppPort: echoServer(t), Protocol: config.ProtocolTCP})
	startProxy(t, serverCfg, iss.holderFor(ordersID))
	httpOut, tcpOut := freeAddr(t), freeAddr(t)
	checkout := startProxy(t, checkoutConfig(
		config.Outbound{Listen: httpOut, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP},
		config.Outbound{Listen: tcpOut, Service: "echo.shipping", Protocol: config.ProtocolTCP},
	), iss.holderFor(checkoutID))

	c, err := net.DialTimeout("tcp", httpOut, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	if code, body := rawGet(t, c, br); code != http.StatusServiceUnavailable || !strings.Contains(body, "orders-api.shipping") || !strings.Contains(body, "no endpoints") {
		t.Fatalf("before the update: %d %q, want 503 naming the service and saying it has no endpoints", code, body)
	}
	s, err := net.DialTimeout("tcp", tcpOut, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	expectClosed(t, s)
	s.Close()
	if v := checkout.ConfigVersion(); v != "" {
		t.Fatalf("ConfigVersion before any update = %q, want empty", v)
	}

	mustApply(t, checkout, Update{Version: "v1", Destinations: []config.Outbound{
		{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: httpIn, Identity: ordersID}}},
		{Service: "echo.shipping", Protocol: config.ProtocolTCP, Endpoints: []config.Endpoint{{Address: tcpIn, Identity: ordersID}}},
	}})
	if code, body := rawGet(t, c, br); code != http.StatusOK || body != "orders" {
		t.Fatalf("after the update, on the connection opened before it: %d %q", code, body)
	}
	if err := meshEcho(tcpOut); err != nil {
		t.Fatalf("stream after the update: %v", err)
	}
	if v := checkout.ConfigVersion(); v != "v1" {
		t.Fatalf("ConfigVersion = %q, want v1", v)
	}
}

// TestZeroEndpoints: a pushed destination whose service has no ready
// instance answers HTTP with a 503 that says so, and closes streams.
func TestZeroEndpoints(t *testing.T) {
	iss := newIssuer(t)
	in := freeAddr(t)
	startProxy(t, ordersConfig(in, serveApp(t, answer("orders")), config.ProtocolHTTP), iss.holderFor(ordersID))
	httpOut, tcpOut := freeAddr(t), freeAddr(t)
	checkout := startProxy(t, checkoutConfig(
		config.Outbound{Listen: httpOut, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}},
		config.Outbound{Listen: tcpOut, Service: "echo.shipping", Protocol: config.ProtocolTCP},
	), iss.holderFor(checkoutID))
	client := &http.Client{Timeout: 10 * time.Second}
	if code, _ := getBody(t, client, "http://"+httpOut+"/"); code != 200 {
		t.Fatalf("with the static endpoint: %d", code)
	}
	mustApply(t, checkout, Update{Version: "scaled-to-zero", Destinations: []config.Outbound{
		{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP},
		{Service: "echo.shipping", Protocol: config.ProtocolTCP},
	}})
	code, body := getBody(t, client, "http://"+httpOut+"/")
	if code != http.StatusServiceUnavailable || body != "trellis: orders-api.shipping unavailable: it has no endpoints (no instance is ready, or the control plane has sent none)\n" {
		t.Fatalf("no endpoints: %d %q", code, body)
	}
	c, err := net.DialTimeout("tcp", tcpOut, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	expectClosed(t, c)
}

// TestApplySecureNamingFollowsTheUpdate changes the identity the endpoint
// of a destination must prove. The pooled connection, verified against the
// old identity, must not carry a request after the update: the server,
// still presenting the old identity, is refused; once it presents the new
// one it is accepted. Then the destination moves to an endpoint of another
// workload.
func TestApplySecureNamingFollowsTheUpdate(t *testing.T) {
	iss := newIssuer(t)
	const v2ID = "spiffe://cluster.local/ns/shipping/sa/orders-api-v2"
	inA, inB := freeAddr(t), freeAddr(t)
	serverA := iss.holderFor(ordersID)
	startProxy(t, ordersConfig(inA, serveApp(t, answer("A")), config.ProtocolHTTP), serverA)
	startProxy(t, ordersConfig(inB, serveApp(t, answer("B")), config.ProtocolHTTP), iss.holderFor(v2ID))
	out := freeAddr(t)
	checkout := startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
		Endpoints: []config.Endpoint{{Address: inA, Identity: ordersID}}}), iss.holderFor(checkoutID))
	client := &http.Client{Timeout: 10 * time.Second}
	url := "http://" + out + "/"
	if code, body := getBody(t, client, url); code != 200 || body != "A" {
		t.Fatalf("before the update: %d %q", code, body)
	}
	to := func(version, addr, id string) Update {
		return Update{Version: version, Destinations: []config.Outbound{{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
			Endpoints: []config.Endpoint{{Address: addr, Identity: id}}}}}
	}

	mustApply(t, checkout, to("v1", inA, v2ID))
	code, body := getBody(t, client, url)
	if code != http.StatusBadGateway || !strings.Contains(body, "secure naming") {
		t.Fatalf("A still presents %s, which the update no longer accepts: %d %q, want 502 (secure naming)", ordersID, code, body)
	}
	serverA.Set(iss.svid(v2ID))
	if code, body := getBody(t, client, url); code != 200 || body != "A" {
		t.Fatalf("A now presents the identity the update names: %d %q", code, body)
	}

	mustApply(t, checkout, to("v2", inB, ordersID))
	if code, body := getBody(t, client, url); code != http.StatusBadGateway || !strings.Contains(body, "secure naming") {
		t.Fatalf("B presents %s, not %s: %d %q, want 502", v2ID, ordersID, code, body)
	}
	mustApply(t, checkout, to("v3", inB, v2ID))
	if code, body := getBody(t, client, url); code != 200 || body != "B" {
		t.Fatalf("after moving to B with its identity: %d %q", code, body)
	}
}

const (
	strictShipping = "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shipping}\nspec: {mtls: {mode: STRICT}}\n"
	denyCheckout   = `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-checkout, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/checkout"]}}]}]
`
)

// TestApplyPolicies pushes policies to a sidecar without a policy
// directory: a switch to STRICT closes an open plaintext stream and refuses
// new plaintext, while mesh traffic flows; an AuthorizationPolicy that
// selects the workload by its registered labels denies the next request.
func TestApplyPolicies(t *testing.T) {
	iss := newIssuer(t)
	httpIn, tcpIn := freeAddr(t), freeAddr(t)
	serverCfg := ordersConfig(httpIn, serveApp(t, answer("orders")), config.ProtocolHTTP)
	serverCfg.Inbound = append(serverCfg.Inbound, config.Inbound{Listen: tcpIn, AppPort: echoServer(t), Protocol: config.ProtocolTCP})
	orders := startProxy(t, serverCfg, iss.holderFor(ordersID))
	out := freeAddr(t)
	startProxy(t, checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP,
		Endpoints: []config.Endpoint{{Address: httpIn, Identity: ordersID}}}), iss.holderFor(checkoutID))
	client := &http.Client{Timeout: 10 * time.Second}

	plain, err := net.DialTimeout("tcp", tcpIn, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := pingPong(plain); err != nil {
		t.Fatalf("plaintext stream under PERMISSIVE: %v", err)
	}

	mustApply(t, orders, Update{Version: "strict", Labels: map[string]string{"app": "orders-api"}, Policies: parsePolicies(t, strictShipping)})
	expectClosed(t, plain)
	if err := meshEcho(tcpIn); err == nil {
		t.Fatal("a new plaintext stream was relayed under STRICT")
	}
	if code, body := getBody(t, client, "http://"+out+"/"); code != 200 || body != "orders" {
		t.Fatalf("mesh request under STRICT: %d %q", code, body)
	}
	if v := orders.PolicyVersion(); v != "strict" {
		t.Fatalf("PolicyVersion = %q, want the update's version", v)
	}

	// The policy selects app=orders-api: the labels the update registers,
	// not those of the static configuration (which has none).
	mustApply(t, orders, Update{Version: "deny", Labels: map[string]string{"app": "orders-api"}, Policies: parsePolicies(t, strictShipping, denyCheckout)})
	code, body := getBody(t, client, "http://"+out+"/")
	if code != http.StatusForbidden || !strings.Contains(body, "shipping/no-checkout") {
		t.Fatalf("after the DENY policy: %d %q, want 403 naming it", code, body)
	}
	mustApply(t, orders, Update{Version: "relabelled", Labels: map[string]string{"app": "other"}, Policies: parsePolicies(t, strictShipping, denyCheckout)})
	if code, _ := getBody(t, client, "http://"+out+"/"); code != 200 {
		t.Fatalf("the DENY policy no longer selects the workload: %d", code)
	}
}

// TestBadUpdateKeepsTheConfiguration: an update that fails validation, and
// one that carries policies to a sidecar with a policy directory, are
// refused whole, and the configuration in force keeps serving.
func TestBadUpdateKeepsTheConfiguration(t *testing.T) {
	iss := newIssuer(t)
	in, other := freeAddr(t), freeAddr(t)
	startProxy(t, ordersConfig(in, serveApp(t, answer("orders")), config.ProtocolHTTP), iss.holderFor(ordersID))
	dir := t.TempDir()
	out := freeAddr(t)
	cfg := checkoutConfig(config.Outbound{Listen: out, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP})
	cfg.Policies = dir
	checkout := startProxy(t, cfg, iss.holderFor(checkoutID))
	good := []config.Outbound{{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: in, Identity: ordersID}}}}
	mustApply(t, checkout, Update{Version: "good", Destinations: good})
	client := &http.Client{Timeout: 10 * time.Second}

	for _, tc := range []struct {
		name string
		u    Update
		want string
	}{
		{"identity is not a SPIFFE ID", Update{Version: "bad-id", Destinations: []config.Outbound{{Service: "orders-api.shipping",
			Endpoints: []config.Endpoint{{Address: other, Identity: "orders-api"}}}}}, "destinations[0].endpoints[0].identity"},
		{"service without namespace", Update{Version: "bad-service", Destinations: []config.Outbound{{Service: "orders-api",
			Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}}}}, "destinations[0].service"},
		{"unknown protocol", Update{Version: "bad-protocol", Destinations: []config.Outbound{{Service: "orders-api.shipping", Protocol: "htp",
			Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}}}}, "destinations[0].protocol"},
		{"one address, two identities", Update{Version: "two-ids", Destinations: []config.Outbound{
			{Service: "orders-api.shipping", Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}},
			{Service: "payments.shipping", Endpoints: []config.Endpoint{{Address: other, Identity: checkoutID}}}}}, "one endpoint has one identity"},
		{"address claimed twice", Update{Version: "two-vips", Destinations: []config.Outbound{
			{Service: "orders-api.shipping", Addresses: []string{"198.18.0.1:80"}},
			{Service: "payments.shipping", Addresses: []string{"198.18.0.1:80"}}}}, "destinations[1].addresses[0]: 198.18.0.1:80 is also destinations[0].addresses[0]"},
		{"listener ambiguous", Update{Version: "two-ports", Destinations: []config.Outbound{
			{Service: "orders-api.shipping", Port: 80, Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}},
			{Service: "orders-api.shipping", Port: 81, Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}}}}, "set outbound[0].port"},
		{"policies and a policy directory", Update{Version: "policies", Policies: parsePolicies(t, strictShipping), Destinations: []config.Outbound{
			{Service: "orders-api.shipping", Endpoints: []config.Endpoint{{Address: other, Identity: ordersID}}}}}, "policies come from the directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkout.Apply(tc.u)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Apply: %v, want an error mentioning %q", err, tc.want)
			}
			if code, body := getBody(t, client, "http://"+out+"/"); code != 200 || body != "orders" {
				t.Fatalf("after the refused update: %d %q", code, body)
			}
			if v := checkout.ConfigVersion(); v != "good" {
				t.Fatalf("ConfigVersion = %q after a refused update", v)
			}
		})
	}
	if err := checkout.Apply(Update{Version: "x", Policies: &policy.Set{}}); !errors.Is(err, ErrPoliciesFromDirectory) {
		t.Fatalf("Apply with policies: %v, want ErrPoliciesFromDirectory", err)
	}
}

// TestApplyUnderLoad applies updates in a loop — moving a destination
// between two backends, adding and removing one, switching the server's
// policies — while HTTP requests and TCP streams flow: none may fail, and
// afterwards no connection pool, connection or goroutine is left over from
// the updates.
func TestApplyUnderLoad(t *testing.T) {
	iss := newIssuer(t)
	httpA, httpB, tcpA := freeAddr(t), freeAddr(t), freeAddr(t)
	cfgA := ordersConfig(httpA, serveApp(t, answer("ok")), config.ProtocolHTTP)
	cfgA.Inbound = append(cfgA.Inbound, config.Inbound{Listen: tcpA, AppPort: echoServer(t), Protocol: config.ProtocolTCP})
	serverA := startProxy(t, cfgA, iss.holderFor(ordersID))
	serverB := startProxy(t, ordersConfig(httpB, serveApp(t, answer("ok")), config.ProtocolHTTP), iss.holderFor(ordersID))
	httpOut, tcpOut := freeAddr(t), freeAddr(t)
	checkout := startProxy(t, checkoutConfig(
		config.Outbound{Listen: httpOut, Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: []config.Endpoint{{Address: httpA, Identity: ordersID}}},
		config.Outbound{Listen: tcpOut, Service: "echo.shipping", Protocol: config.ProtocolTCP, Endpoints: []config.Endpoint{{Address: tcpA, Identity: ordersID}}},
	), iss.holderFor(checkoutID))
	client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	// settle closes the keep-alive connections whose number depends on how
	// many requests happened to run at once (the test's to the caller,
	// the servers' to their applications) and the idle pooled ones, so
	// that goroutines can be compared before and after.
	settle := func() {
		client.CloseIdleConnections()
		for _, p := range []*Proxy{serverA, serverB, checkout} {
			p.appHTTP1.(*http.Transport).CloseIdleConnections()
		}
		checkout.mesh.closeIdle()
	}
	if code, _ := getBody(t, client, "http://"+httpOut+"/"); code != 200 {
		t.Fatalf("warm-up request: %d", code)
	}
	settle()
	waitFor(t, func() error {
		if n := checkout.mesh.conns.Load(); n > 0 {
			return fmt.Errorf("%d pooled connections still open after the warm-up", n)
		}
		return nil
	})
	baseline := runtime.NumGoroutine()

	ep := func(addrs ...string) []config.Endpoint {
		var eps []config.Endpoint
		for _, a := range addrs {
			eps = append(eps, config.Endpoint{Address: a, Identity: ordersID})
		}
		return eps
	}
	echo := config.Outbound{Service: "echo.shipping", Protocol: config.ProtocolTCP, Endpoints: ep(tcpA)}
	variants := [][]config.Outbound{
		{{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: ep(httpA)}, echo},
		{{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: ep(httpB)}, echo},
		{{Service: "orders-api.shipping", Protocol: config.ProtocolHTTP, Endpoints: ep(httpA, httpB)}, echo,
			{Service: "extra.shipping", Protocol: config.ProtocolHTTP, Endpoints: ep(httpB)}},
	}
	permissive := parsePolicies(t, "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shipping}\nspec: {mtls: {mode: PERMISSIVE}}\n")
	strict := parsePolicies(t, strictShipping)

	stop := make(chan struct{})
	var applies atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			v := fmt.Sprint("v", i)
			if err := checkout.Apply(Update{Version: v, Destinations: variants[i%len(variants)]}); err != nil {
				t.Errorf("Apply %s: %v", v, err)
				return
			}
			set := permissive
			if i%2 == 1 {
				set = strict
			}
			if err := serverA.Apply(Update{Version: v, Policies: set}); err != nil {
				t.Errorf("Apply %s to the server: %v", v, err)
				return
			}
			applies.Add(1)
			select { // pace the updates so that each sees traffic
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()

	var failures atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	const workers, perWorker = 6, 150
	var load sync.WaitGroup
	for w := range workers {
		load.Add(1)
		go func() {
			defer load.Done()
			for i := range perWorker {
				if w%3 != 2 {
					resp, err := client.Get("http://" + httpOut + "/")
					if err != nil {
						fail(err)
						continue
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 || string(body) != "ok" {
						fail(fmt.Errorf("status %d body %q", resp.StatusCode, body))
					}
					continue
				}
				if err := meshEcho(tcpOut); err != nil {
					fail(fmt.Errorf("stream %d-%d: %w", w, i, err))
				}
			}
		}()
	}
	load.Wait()
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d requests/streams failed during %d updates; first: %v", n, workers*perWorker, applies.Load(), firstErr.Load())
	}
	if applies.Load() < 20 {
		t.Fatalf("only %d updates happened during the load; the test did not exercise them", applies.Load())
	}

	// Every pool left belongs to an endpoint of the table in force: the
	// retired ones closed when their last request was done.
	peers := int64(len(checkout.table.Load().peers))
	waitFor(t, func() error {
		if n := checkout.mesh.pools.Load(); n > peers {
			return fmt.Errorf("after %d updates, %d connection pools are open for %d endpoints: retired pools leak", applies.Load(), n, peers)
		}
		return nil
	})
	// Once idle connections are closed, no goroutine is left over from
	// the updates.
	settle()
	waitFor(t, func() error {
		if conns, n := checkout.mesh.conns.Load(), runtime.NumGoroutine(); conns > 0 || n > baseline+2 {
			return fmt.Errorf("after %d updates and closing idle connections: %d pooled connections open, %d goroutines (%d before)", applies.Load(), conns, n, baseline)
		}
		return nil
	})
	t.Logf("%d updates under %d requests and streams; afterwards %d pools for %d endpoints, %d goroutines (%d before)",
		applies.Load(), workers*perWorker, checkout.mesh.pools.Load(), peers, runtime.NumGoroutine(), baseline)
}

// waitFor polls cond until it returns nil, failing the test with its last
// error after 10 seconds.
func waitFor(t *testing.T, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// A proxy that awaits the control plane admits nothing until its first
// update: plaintext is refused, mesh requests are denied with a reason.
func TestAwaitUpdateStartsClosed(t *testing.T) {
	set := awaitingPolicies()
	st, err := compilePolicies(set, policy.Workload{Namespace: "shipping", Name: "orders"}, AwaitingVersion)
	if err != nil {
		t.Fatal(err)
	}
	if mode := st.ports.Mode(8080); mode != policy.ModeStrict {
		t.Fatalf("mode before the first update = %s, want STRICT", mode)
	}
	for _, req := range []*authz.Request{
		{HTTP: true, Port: 8080, Principal: "cluster.local/ns/default/sa/checkout", Namespace: "default", Method: "GET", Path: "/"},
		{Port: 6379, Principal: "cluster.local/ns/default/sa/checkout", Namespace: "default"},
	} {
		if res := st.authz.Evaluate(req); res.Allowed {
			t.Fatalf("%+v was allowed before the first update", req)
		}
	}
}
