package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// svidTTL is the lifetime of the simulated proxies' certificates: a
// stream ends when the certificate it was opened with expires.
const svidTTL = 12 * time.Hour

// identities issues one SVID per workload (replicas share their service
// account's identity) and returns the TLS credentials of each, verifying
// the control plane's SPIFFE ID as a real proxy does.
func identities(stateDir string, shape meshShape) ([]credentials.TransportCredentials, error) {
	authority, err := ca.Load(ca.Config{StateDir: stateDir})
	if err != nil {
		return nil, fmt.Errorf("open the control plane's CA: %w", err)
	}
	td := authority.TrustDomain()
	out := make([]credentials.TransportCredentials, shape.workloads)
	for w := range shape.workloads {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		ns := namespaceName(shape.namespaceOf(w))
		id, err := meshid.Workload(td, ns, workloadName(w))
		if err != nil {
			return nil, err
		}
		chain, err := authority.SignPublicKey(key.Public(), id, svidTTL)
		if err != nil {
			return nil, fmt.Errorf("sign an SVID for %s: %w", id, err)
		}
		svid, err := identity.NewSVID(chain, key, authority.Bundle(), time.Now())
		if err != nil {
			return nil, err
		}
		holder := &identity.Holder{}
		holder.Set(svid)
		out[w] = credentials.NewTLS(clientTLS(holder, meshid.ControlPlane(td)))
	}
	return out, nil
}

// clientTLS is the discovery client's TLS configuration
// (internal/discovery does the same).
func clientTLS(holder *identity.Holder, server spiffeid.ID) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13}
	tlsconfig.HookTLSClientConfig(cfg, holder, tlsconfig.AuthorizeID(server))
	cfg.GetClientCertificate = holder.GetClientCertificate
	return cfg
}

// receipt is one update as a simulated proxy received it.
type receipt struct {
	version string
	at      time.Time
}

// simProxy is one simulated proxy: its own gRPC connection (so its own
// TCP and TLS connection), one discovery stream, every update recorded
// and acknowledged at once.
type simProxy struct {
	idx      int // -1 for the extra instance of the endpoint phases
	workload int
	instance string
	// decodeAll makes the proxy decode updates in full (and count their
	// endpoints) instead of reading only their version.
	decodeAll bool

	conn   *grpc.ClientConn
	stream discoveryv1.Discovery_StreamClient
	codec  *versionCodec
	cancel context.CancelFunc
	sendMu sync.Mutex // the receive loop's ACKs and a Goodbye

	mu        sync.Mutex
	receipts  []receipt // since the last reset
	last      string    // version of the last update received
	lastBytes int
	// destinations and endpoints of the last update (decodeAll only).
	destinations, endpoints int
	err                     error // why the stream ended, if it did
	ended                   bool
}

// activity is shared by every proxy of a run: how many updates arrived,
// and when the last one did (Unix nanoseconds).
type activity struct {
	updates atomic.Int64
	lastAt  atomic.Int64
}

// dial connects the proxy and opens its stream, without registering:
// hello does.
func (p *simProxy) dial(ctx context.Context, addr string, creds credentials.TransportCredentials, timeout time.Duration) error {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(creds),
		// As internal/discovery: a ping after 30 s without traffic.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 15 * time.Second}))
	if err != nil {
		return err
	}
	p.conn = conn
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn.Connect()
	for {
		s := conn.GetState()
		if s == connectivity.Ready {
			break
		}
		// A transient failure is retried by gRPC with backoff: wait on
		// until the deadline.
		if !conn.WaitForStateChange(dctx, s) {
			return fmt.Errorf("connect: still %v after %v", s, timeout)
		}
	}
	sctx, scancel := context.WithCancel(context.Background())
	p.cancel = scancel
	var opts []grpc.CallOption
	if !p.decodeAll {
		p.codec = &versionCodec{}
		opts = append(opts, grpc.ForceCodecV2(p.codec))
	}
	stream, err := discoveryv1.NewDiscoveryClient(conn).Stream(sctx, opts...)
	if err != nil {
		return fmt.Errorf("open the discovery stream: %w", err)
	}
	p.stream = stream
	return nil
}

// hello registers the proxy's instance and starts receiving.
func (p *simProxy) hello(act *activity, withPort bool) error {
	h := &discoveryv1.Hello{Workload: workloadName(p.workload), Instance: p.instance}
	if withPort {
		addr := instanceAddr(p.idx)
		if p.idx < 0 {
			addr = fmt.Sprintf("10.255.255.254:%d", workloadPort)
		}
		h.Ports = []*discoveryv1.PortAddress{{Port: workloadPort, Address: addr}}
	}
	if err := p.send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Hello{Hello: h}}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	go p.receive(act)
	return nil
}

func (p *simProxy) send(m *discoveryv1.ProxyMessage) error {
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	return p.stream.Send(m)
}

// receive records and acknowledges every update until the stream ends.
func (p *simProxy) receive(act *activity) {
	for {
		u, err := p.stream.Recv()
		if err != nil {
			p.mu.Lock()
			p.ended, p.err = true, err
			p.mu.Unlock()
			return
		}
		now := time.Now()
		act.updates.Add(1)
		act.lastAt.Store(now.UnixNano())
		ackErr := p.send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Ack{Ack: &discoveryv1.Ack{Version: u.GetVersion()}}})
		p.mu.Lock()
		p.receipts = append(p.receipts, receipt{version: u.GetVersion(), at: now})
		p.last = u.GetVersion()
		if p.codec != nil {
			p.lastBytes = p.codec.size
		} else {
			p.lastBytes = proto.Size(u)
			p.destinations, p.endpoints = len(u.GetDestinations()), 0
			for _, d := range u.GetDestinations() {
				p.endpoints += len(d.GetEndpoints())
			}
		}
		if ackErr != nil && !p.ended {
			p.ended, p.err = true, fmt.Errorf("send ack: %w", ackErr)
		}
		p.mu.Unlock()
	}
}

// goodbye says goodbye, as a proxy that shuts down does.
func (p *simProxy) goodbye() error {
	return p.send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Goodbye{Goodbye: &discoveryv1.Goodbye{}}})
}

// reset forgets the updates received so far.
func (p *simProxy) reset() {
	p.mu.Lock()
	p.receipts = p.receipts[:0]
	p.mu.Unlock()
}

// snapshot returns the updates received since the last reset and the
// version of the last update.
func (p *simProxy) snapshot() ([]receipt, string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var err error
	if p.ended {
		err = p.err
		if err == nil {
			err = errors.New("stream ended")
		}
	}
	return append([]receipt(nil), p.receipts...), p.last, err
}

func (p *simProxy) close() {
	if p.cancel != nil {
		p.cancel()
	}
	if p.conn != nil {
		_ = p.conn.Close()
	}
}

// versionCodec is the proto codec, except that an Update is not decoded:
// only its version (field 1, which the Go protobuf runtime writes first)
// is read, and its size noted. A simulated proxy thus spends almost no
// CPU on updates of thousands of endpoints, which would otherwise be
// counted against the control plane sharing this machine. Updates whose
// version does not come first are decoded in full.
type versionCodec struct {
	size int // of the last update, read by the receive loop after Recv
}

var protoCodec = encoding.GetCodecV2("proto")

func (*versionCodec) Name() string { return "proto" }

func (*versionCodec) Marshal(v any) (mem.BufferSlice, error) { return protoCodec.Marshal(v) }

func (c *versionCodec) Unmarshal(data mem.BufferSlice, v any) error {
	u, ok := v.(*discoveryv1.Update)
	if !ok {
		return protoCodec.Unmarshal(data, v)
	}
	c.size = data.Len()
	if version, ok := leadingVersion(data); ok {
		u.Version = version
		return nil
	}
	return protoCodec.Unmarshal(data, v)
}

// leadingVersion returns field 1 of an Update if it is the first field.
func leadingVersion(data mem.BufferSlice) (string, bool) {
	var head [96]byte
	n := 0
	for _, b := range data {
		n += copy(head[n:], b.ReadOnlyData())
		if n == len(head) {
			break
		}
	}
	num, typ, tl := protowire.ConsumeTag(head[:n])
	if tl < 0 || num != 1 || typ != protowire.BytesType {
		return "", false
	}
	v, vl := protowire.ConsumeBytes(head[tl:n])
	if vl < 0 {
		return "", false
	}
	return string(v), true
}
