// Package discovery is the proxy's side of the discovery service: it keeps
// one stream to the control plane, registers the workload instance the
// proxy serves, applies every update it receives and acknowledges it (or
// reports why not). When the control plane is unreachable the proxy keeps
// running what it has and reconnects with backoff and jitter.
package discovery

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/identity"
)

// Defaults.
const (
	DefaultHeartbeat = 30 * time.Second
	// goodbyeWait bounds how long shutdown waits for the control plane to
	// acknowledge a Goodbye by ending the stream.
	goodbyeWait = 2 * time.Second
	// stableSession is how long a stream must last for the reconnect
	// backoff to start over.
	stableSession = 30 * time.Second
)

// Config configures a Client.
type Config struct {
	// Addr is the control plane's discovery (and identity) address.
	Addr string
	// ServerID is the SPIFFE ID the control plane must prove.
	ServerID spiffeid.ID
	// Holder supplies the client certificate and the trust bundle.
	Holder   *identity.Holder
	Workload string
	Instance string
	Ports    []*discoveryv1.PortAddress
	// StatsAddress is where the proxy serves its metrics for the control
	// plane to scrape (ip:port); empty for none.
	StatsAddress string
	// Tapper runs the live taps the control plane asks for; nil for none.
	Tapper Tapper
	// Apply installs an update; an error is sent back as a NACK and the
	// proxy keeps its previous configuration.
	Apply     func(*discoveryv1.Update) error
	Heartbeat time.Duration
	Log       *slog.Logger
	// Dial options for tests.
	DialOptions []grpc.DialOption
}

// Client follows the control plane.
type Client struct {
	cfg     Config
	mu      sync.Mutex
	version string // last applied
	// dests are the destinations last applied, which incremental updates
	// change; needWhole is set after a refusal.
	dests     map[destinationKey]*discoveryv1.Destination
	needWhole bool
	synced    chan struct{}
	once      sync.Once
}

// New returns a Client; Run connects.
func New(cfg Config) (*Client, error) {
	if cfg.Holder == nil || cfg.Apply == nil {
		return nil, errors.New("discovery: a holder and an apply function are required")
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = DefaultHeartbeat
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Client{cfg: cfg, synced: make(chan struct{})}, nil
}

// Version returns the version of the last update applied, "" before the
// first.
func (c *Client) Version() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.version
}

// apply merges an update into the destinations the proxy has (an
// incremental update lists only changes) and hands the whole result to
// Config.Apply. After a refusal only a whole update is accepted: the
// control plane built the updates after the refused one on it.
func (c *Client) apply(u *discoveryv1.Update) error {
	c.mu.Lock()
	have, needWhole := c.dests, c.needWhole
	c.mu.Unlock()
	if u.GetIncremental() && (needWhole || have == nil) {
		return errors.New("an incremental update on a base this proxy does not have; send the whole configuration")
	}
	next := map[destinationKey]*discoveryv1.Destination{}
	if u.GetIncremental() {
		maps.Copy(next, have)
		for _, k := range u.GetRemovedDestinations() {
			delete(next, destinationKey{k.GetService(), k.GetPort()})
		}
	}
	for _, d := range u.GetDestinations() {
		next[destinationKey{d.GetService(), d.GetPort()}] = d
	}
	whole := &discoveryv1.Update{
		Version: u.GetVersion(), Workload: u.GetWorkload(),
		PeerAuthentications: u.GetPeerAuthentications(), AuthorizationPolicies: u.GetAuthorizationPolicies(),
		RegistryOnly: u.GetRegistryOnly(), GatewayRoutes: u.GetGatewayRoutes(),
		Destinations: slices.SortedFunc(maps.Values(next), func(a, b *discoveryv1.Destination) int {
			return cmp.Or(cmp.Compare(a.GetService(), b.GetService()), cmp.Compare(a.GetPort(), b.GetPort()))
		}),
	}
	err := c.cfg.Apply(whole)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.needWhole = true
		return err
	}
	c.dests, c.needWhole, c.version = next, false, u.GetVersion()
	return nil
}

type destinationKey struct {
	service string
	port    uint32
}

// Synced is closed once the first update has been applied.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Run keeps a stream to the control plane until ctx ends, then says
// goodbye so that the instance leaves its services at once.
func (c *Client) Run(ctx context.Context) error {
	attempt := 0
	for {
		if !c.waitForCertificate(ctx) {
			return nil
		}
		start := time.Now()
		err := c.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errRenewed) {
			attempt = 0
			continue // at once, with the new certificate
		}
		if time.Since(start) > stableSession {
			attempt = 0
		}
		wait := identity.Backoff(attempt, rand.Float64())
		attempt++
		level := slog.LevelWarn
		switch status.Code(err) {
		case codes.PermissionDenied, codes.InvalidArgument, codes.Aborted:
			level = slog.LevelError // a configuration problem, not an outage
		}
		c.cfg.Log.Log(ctx, level, "control plane stream ended; keeping the current configuration and reconnecting",
			"addr", c.cfg.Addr, "err", err, "retryIn", wait.Round(time.Millisecond), "version", c.Version())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

func (c *Client) waitForCertificate(ctx context.Context) bool {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for c.cfg.Holder.Current() == nil {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	return true
}

// maxUpdateSize bounds an update the proxy accepts.
const maxUpdateSize = 64 << 20

// errRenewed ends a session whose connection was authenticated with a
// certificate that has since been renewed.
var errRenewed = errors.New("certificate renewed")

// certificateCheck is how often a session checks whether the certificate
// it connected with has been renewed.
const certificateCheck = time.Second

// session runs one stream, on a connection of its own, until it fails, ctx
// ends, or the certificate is renewed. A connection of its own, because a
// TLS connection keeps the client certificate of its handshake: the
// control plane ends the stream when that certificate expires, and a
// stream reopened on the same connection would present it again.
func (c *Client) session(ctx context.Context) error {
	svid := c.cfg.Holder.Current()
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS13}
	tlsconfig.HookTLSClientConfig(tlsCfg, c.cfg.Holder, tlsconfig.AuthorizeID(c.cfg.ServerID))
	tlsCfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return svid.TLSCertificate(), nil }
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		// Notice a control plane that vanished without closing the
		// connection within a minute, not after TCP gives up.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 15 * time.Second}),
		// An update lists every endpoint of every destination: about 60
		// bytes each, past gRPC's default 4 MB from some 70,000.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxUpdateSize)),
	}, c.cfg.DialOptions...)
	conn, err := grpc.NewClient(c.cfg.Addr, opts...)
	if err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	defer conn.Close()
	// The stream outlives ctx by the goodbye.
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := discoveryv1.NewDiscoveryClient(conn).Stream(sctx)
	if err != nil {
		return err
	}
	// A new stream starts from the version announced here, which is what
	// dests hold: incremental updates may build on it again.
	c.mu.Lock()
	c.needWhole = false
	c.mu.Unlock()
	hello := &discoveryv1.Hello{Workload: c.cfg.Workload, Instance: c.cfg.Instance, Ports: c.cfg.Ports, Version: c.Version(), StatsAddress: c.cfg.StatsAddress}
	if err := stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Hello{Hello: hello}}); err != nil {
		return recvError(stream, err)
	}
	if c.cfg.Tapper != nil {
		tapDone := make(chan struct{})
		go func() { c.tap(sctx, conn); close(tapDone) }()
		defer func() { cancel(); <-tapDone }()
	}
	updates := make(chan *discoveryv1.Update)
	recvErr := make(chan error, 1)
	go func() {
		for {
			u, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case updates <- u:
			case <-sctx.Done():
				return
			}
		}
	}()
	heartbeat := time.NewTicker(c.cfg.Heartbeat)
	defer heartbeat.Stop()
	renewal := time.NewTicker(certificateCheck)
	defer renewal.Stop()
	for {
		select {
		case <-renewal.C:
			if c.cfg.Holder.Current() != svid {
				// No goodbye: the instance stays, the next session
				// takes it over with the renewed certificate.
				return errRenewed
			}
		case <-ctx.Done():
			_ = stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Goodbye{Goodbye: &discoveryv1.Goodbye{}}})
			_ = stream.CloseSend()
			select {
			case <-recvErr:
			case <-time.After(goodbyeWait):
			}
			return nil
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return errors.New("the control plane closed the stream")
			}
			return err
		case u := <-updates:
			ack := &discoveryv1.Ack{Version: u.GetVersion()}
			if err := c.apply(u); err != nil {
				ack.Error = err.Error()
				c.cfg.Log.Error("configuration rejected; keeping the previous one", "version", u.GetVersion(), "err", err)
			} else {
				c.once.Do(func() { close(c.synced) })
			}
			if err := stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Ack{Ack: ack}}); err != nil {
				return streamError(recvErr, err)
			}
		case <-heartbeat.C:
			if err := stream.Send(&discoveryv1.ProxyMessage{Message: &discoveryv1.ProxyMessage_Heartbeat{Heartbeat: &discoveryv1.Heartbeat{}}}); err != nil {
				return streamError(recvErr, err)
			}
		}
	}
}

// streamError turns a failed Send into the stream's real status, which only
// Recv reports, once the receiving goroutine has it.
func streamError(recvErr <-chan error, sendErr error) error {
	if !errors.Is(sendErr, io.EOF) {
		return sendErr
	}
	select {
	case err := <-recvErr:
		return err
	case <-time.After(goodbyeWait):
		return sendErr
	}
}

// recvError turns a failed Send into the stream's real status, which only
// Recv reports; for use before anything else reads the stream.
func recvError(stream discoveryv1.Discovery_StreamClient, sendErr error) error {
	if !errors.Is(sendErr, io.EOF) {
		return sendErr
	}
	for {
		if _, err := stream.Recv(); err != nil {
			return err
		}
	}
}
