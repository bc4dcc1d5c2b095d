package push

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// heldStream is a Discovery_StreamServer whose Send the test can hold, to
// reproduce a proxy that reads slowly.
type heldStream struct {
	grpc.ServerStream
	ctx     context.Context
	in      chan *discoveryv1.ProxyMessage
	entered chan struct{} // a Send started
	gate    chan struct{} // Send waits for it when non-nil
	sent    chan *discoveryv1.Update
}

func (f *heldStream) Context() context.Context { return f.ctx }

func (f *heldStream) Recv() (*discoveryv1.ProxyMessage, error) {
	select {
	case m := <-f.in:
		return m, nil
	case <-f.ctx.Done():
		return nil, io.EOF
	}
}

func (f *heldStream) Send(u *discoveryv1.Update) error {
	f.entered <- struct{}{}
	if f.gate != nil {
		<-f.gate
	}
	f.sent <- u
	return nil
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A view that goes A → B → A while the stream is inside Send(B) must still
// reach the proxy: versions are content hashes, so the second A equals
// what was sent before B, and only a check after Send notices.
func TestViewRevertedDuringSendIsSent(t *testing.T) {
	var srv *Server
	reg, err := registry.New(registry.Config{
		Declarations: registry.Declarations{
			Workloads: []registry.Workload{
				{Namespace: "web", Name: "frontend", ServiceAccount: "frontend"},
				{Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders"}, Ports: []registry.WorkloadPort{{Port: 8080}}},
			},
			Services: []registry.Service{{Namespace: "shipping", Name: "orders", Selector: map[string]string{"app": "orders"}, Ports: []registry.ServicePort{{Port: 80, TargetPort: 8080}}}},
		},
		GracePeriod: time.Hour,
		OnChange:    func() { srv.Changed() },
	})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/web/sa/frontend")
	srv = New(Config{Registry: reg, Coalesce: 5 * time.Millisecond, Verify: func([]*x509.Certificate) (spiffeid.ID, error) { return id, nil }})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.Run(ctx) }()

	cert := &x509.Certificate{NotAfter: time.Now().Add(time.Hour)}
	sctx := peer.NewContext(ctx, &peer.Peer{AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}}}})
	fs := &heldStream{ctx: sctx, in: make(chan *discoveryv1.ProxyMessage, 10), entered: make(chan struct{}, 10), sent: make(chan *discoveryv1.Update, 10)}
	fs.in <- &discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Hello{Hello: &discoveryv1.Hello{Workload: "frontend", Instance: "f1"}}}
	go func() { _ = srv.Stream(fs) }()
	<-fs.entered
	a := <-fs.sent

	fs.gate = make(chan struct{}) // the stream goroutine reads it only in Send, after entered
	orders := registry.Instance{Namespace: "shipping", Workload: "orders", Instance: "o1", Identity: "spiffe://cluster.local/ns/shipping/sa/orders", Ports: map[uint32]string{8080: "10.0.0.1:8080"}}
	session, err := reg.Register(orders)
	if err != nil {
		t.Fatal(err)
	}
	<-fs.entered // Send(B) is under way, held
	reg.Disconnect(orders.Key(), session, true)
	waitUntil(t, "the view to be A again", func() bool { return srv.viewOf("web/frontend").version == a.GetVersion() })
	close(fs.gate)
	b := <-fs.sent
	if b.GetVersion() == a.GetVersion() {
		t.Fatal("the held update was not B")
	}
	select {
	case <-fs.entered:
		if u := <-fs.sent; u.GetVersion() != a.GetVersion() {
			t.Fatalf("sent %s, want A %s", u.GetVersion(), a.GetVersion())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the proxy was left on B %s while its view is A %s", b.GetVersion(), a.GetVersion())
	}
}

// TestStreamEndsWhenItsPodIsGone: a stream whose instance the declarations
// drop (its pod was deleted) ends with PermissionDenied; so does one whose
// proxy connects from another address than its pod's; a Hold server
// sends nothing until Release.
func TestStreamEndsWhenItsPodIsGone(t *testing.T) {
	var srv *Server
	pod := func(ip string) registry.Declarations {
		return registry.Declarations{Workloads: []registry.Workload{{
			Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Ports: []registry.WorkloadPort{{Port: 8080}},
			Instances: map[string]registry.DeclaredInstance{"orders-a": {IP: netip.MustParseAddr(ip), ServiceAccount: "orders"}},
		}}}
	}
	reg, err := registry.New(registry.Config{Declarations: pod("10.0.0.5"), GracePeriod: time.Hour, OnChange: func() { srv.Changed() }})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders")
	srv = New(Config{Registry: reg, Coalesce: 5 * time.Millisecond, Hold: true, Verify: func([]*x509.Certificate) (spiffeid.ID, error) { return id, nil }})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.Run(ctx) }()

	open := func(from string) (*heldStream, chan error) {
		cert := &x509.Certificate{NotAfter: time.Now().Add(time.Hour)}
		sctx := peer.NewContext(ctx, &peer.Peer{Addr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(from)),
			AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}}}})
		fs := &heldStream{ctx: sctx, in: make(chan *discoveryv1.ProxyMessage, 10), entered: make(chan struct{}, 10), sent: make(chan *discoveryv1.Update, 10)}
		fs.in <- &discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Hello{Hello: &discoveryv1.Hello{Workload: "orders", Instance: "orders-a",
			Ports: []*discoveryv1.PortAddress{{Port: 8080, Address: "10.0.0.5:8080"}}}}}
		done := make(chan error, 1)
		go func() { done <- srv.Stream(fs) }()
		return fs, done
	}

	fs, done := open("10.0.0.5:40000")
	select {
	case <-fs.entered:
		t.Fatal("an update was sent before Release")
	case <-time.After(50 * time.Millisecond):
	}
	srv.Release()
	<-fs.entered
	<-fs.sent

	reg.SetDeclarations(pod("10.0.0.6")) // the pod is gone; another took its name
	select {
	case err := <-done:
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("stream ended with %v, want PermissionDenied", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream of a deleted pod is still open")
	}

	// The new pod's name, from the old pod's address: refused.
	_, done = open("10.0.0.5:40001")
	if err := <-done; status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "connects from") {
		t.Fatalf("a proxy connecting from another pod's address: %v", err)
	}
}
