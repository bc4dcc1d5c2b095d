// Package identityservice is the gRPC service that turns a proof of identity
// into an X.509-SVID. A workload proves who it is with a credential checked
// by a pluggable Authenticator (a join token here; Kubernetes ServiceAccount
// tokens plug in the same way) or, to renew, with its current SVID as TLS
// client certificate. The CA then signs the workload's CSR for exactly that
// identity.
package identityservice

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	identityv1 "github.com/trellis-mesh/trellis/api/identity/v1"
	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/jointoken"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// Authenticator checks one type of credential and returns the SPIFFE ID the
// caller has proved it may have.
type Authenticator interface {
	// Type is the credential type it handles, as sent in Credential.type.
	Type() string
	Authenticate(ctx context.Context, credential string) (spiffeid.ID, error)
}

// ErrUnauthenticated is wrapped by authenticators when a credential is not
// valid; the service answers codes.Unauthenticated.
var ErrUnauthenticated = errors.New("unauthenticated")

// JoinTokenType is the credential type of bootstrap join tokens.
const JoinTokenType = identity.CredentialJoinToken

// JoinTokens authenticates bootstrap join tokens from a token store.
type JoinTokens struct {
	Store       *jointoken.Store
	TrustDomain spiffeid.TrustDomain
}

// Type implements Authenticator.
func (JoinTokens) Type() string { return JoinTokenType }

// Authenticate redeems the token (consuming one use) and returns the
// identity it is bound to.
func (j JoinTokens) Authenticate(_ context.Context, credential string) (spiffeid.ID, error) {
	tok, err := j.Store.Redeem(credential)
	if err != nil {
		if errors.Is(err, jointoken.ErrInvalid) {
			return spiffeid.ID{}, fmt.Errorf("%w: %v", ErrUnauthenticated, err)
		}
		return spiffeid.ID{}, err
	}
	return meshid.Workload(j.TrustDomain, tok.Namespace, tok.ServiceAccount)
}

// Config configures a Service.
type Config struct {
	CA             *ca.CA
	Authenticators []Authenticator
	Log            *slog.Logger
	// Now is the service's clock; nil means time.Now.
	Now func() time.Time
	// ServingTTL is the lifetime of the service's own certificate.
	ServingTTL time.Duration
	// MaxTTL caps the lifetime a workload may ask for, so that one stolen
	// credential cannot buy a certificate valid for months; zero means
	// ca.DefaultWorkloadTTL.
	MaxTTL time.Duration
	// RequireCredential refuses renewals by certificate alone: every
	// request proves its identity afresh (in Kubernetes, with the pod's
	// token, so that a deleted pod's certificate — or its stolen key —
	// cannot renew itself for ever).
	RequireCredential bool
}

// Service implements the Identity gRPC service.
type Service struct {
	identityv1.UnimplementedIdentityServer
	cfg   Config
	auths map[string]Authenticator
	id    spiffeid.ID

	serving   atomic.Pointer[tls.Certificate]
	servingMu sync.Mutex
}

// New returns a Service. It serves as the control plane's SPIFFE ID.
func New(cfg Config) *Service {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ServingTTL == 0 {
		cfg.ServingTTL = ca.DefaultWorkloadTTL
	}
	if cfg.MaxTTL == 0 {
		cfg.MaxTTL = ca.DefaultWorkloadTTL
	}
	s := &Service{cfg: cfg, auths: map[string]Authenticator{}, id: meshid.ControlPlane(cfg.CA.TrustDomain())}
	for _, a := range cfg.Authenticators {
		s.auths[a.Type()] = a
	}
	return s
}

// Register adds the service to a gRPC server.
func (s *Service) Register(g *grpc.Server) { identityv1.RegisterIdentityServer(g, s) }

// ServerCredentials returns TLS credentials for a gRPC server: the service's
// own SVID, renewed as it ages, and optional client SVIDs verified against
// the CA's current bundle.
func (s *Service) ServerCredentials() credentials.TransportCredentials {
	return credentials.NewTLS(s.TLSConfig())
}

// TLSConfig is the server TLS configuration behind ServerCredentials.
func (s *Service) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.servingCertificate() },
		// A first request has no certificate yet, so a client certificate
		// is optional; when given it must be a valid SVID of our bundle.
		ClientAuth: tls.RequestClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return nil
			}
			_, _, err := x509svid.ParseAndVerify(raw, s.bundleSource(), x509svid.WithTime(s.cfg.Now()))
			return err
		},
		NextProtos: []string{"h2"},
		// Resumption would skip the client certificate check at handshake.
		SessionTicketsDisabled: true,
	}
}

func (s *Service) bundleSource() x509bundle.Source {
	return x509bundle.FromX509Authorities(s.cfg.CA.TrustDomain(), s.cfg.CA.Bundle())
}

// servingCertificate returns the service's SVID, issuing a new one when the
// current one is past two thirds of its life (or the CA's issuer changed,
// as after a root rotation).
func (s *Service) servingCertificate() (*tls.Certificate, error) {
	now := s.cfg.Now()
	if c := s.serving.Load(); c != nil && !s.stale(c, now) {
		return c, nil
	}
	s.servingMu.Lock()
	defer s.servingMu.Unlock()
	if c := s.serving.Load(); c != nil && !s.stale(c, now) {
		return c, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	chain, err := s.cfg.CA.SignPublicKey(key.Public(), s.id, s.cfg.ServingTTL)
	if err != nil {
		if c := s.serving.Load(); c != nil && now.Before(c.Leaf.NotAfter) {
			s.cfg.Log.Error("renewing the serving certificate failed; serving the current one", "err", err)
			return c, nil
		}
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, cert := range chain {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	s.serving.Store(c)
	return c, nil
}

func (s *Service) stale(c *tls.Certificate, now time.Time) bool {
	if ca.ShouldRotate(now, c.Leaf.NotBefore, c.Leaf.NotAfter) {
		return true
	}
	issuer := s.cfg.CA.Issuer()
	return c.Leaf.CheckSignatureFrom(issuer) != nil
}

// SignCertificate implements identityv1.IdentityServer.
func (s *Service) SignCertificate(ctx context.Context, req *identityv1.SignCertificateRequest) (*identityv1.SignCertificateResponse, error) {
	ttl := req.GetTtl().AsDuration() // zero when absent: the CA's default
	// Check what can be checked before authenticating, so that a malformed
	// request does not spend a single-use credential.
	if err := s.precheck(req.GetCsr(), ttl); err != nil {
		s.cfg.Log.Warn("identity request refused", "peer", peerAddr(ctx), "err", err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	id, via, err := s.authenticate(ctx, req.GetCredential())
	if err != nil {
		s.cfg.Log.Warn("identity request refused", "peer", peerAddr(ctx), "err", err)
		return nil, err
	}
	if id == s.id {
		// Whoever held this identity could pose as the control plane to
		// every workload; it is issued only in-process.
		s.cfg.Log.Warn("identity request refused: the control plane's identity was asked for", "peer", peerAddr(ctx), "via", via)
		return nil, status.Errorf(codes.PermissionDenied, "%s is reserved for the control plane", id)
	}
	chain, err := s.cfg.CA.Sign(req.GetCsr(), id, ttl)
	if err != nil {
		s.cfg.Log.Warn("identity request refused", "id", id, "via", via, "err", err)
		if errors.Is(err, ca.ErrInvalidCSR) || errors.Is(err, ca.ErrTTL) {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		// Details (paths, lock errors) stay in the server's log.
		return nil, status.Error(codes.Internal, "the certificate authority could not sign; see the control plane's log")
	}
	resp := &identityv1.SignCertificateResponse{
		SpiffeId:  id.String(),
		ExpiresAt: timestamppb.New(chain[0].NotAfter),
	}
	for _, c := range chain {
		resp.CertificateChain = append(resp.CertificateChain, c.Raw)
	}
	for _, c := range s.cfg.CA.Bundle() {
		resp.TrustBundle = append(resp.TrustBundle, c.Raw)
	}
	s.cfg.Log.Info("issued certificate", "id", id, "via", via, "serial", chain[0].SerialNumber.Text(16), "notAfter", chain[0].NotAfter.UTC())
	return resp, nil
}

// precheck validates the parts of a request that do not depend on who the
// caller is: the TTL bound and the CSR's form (its identity is checked
// against the authenticated one when signing).
func (s *Service) precheck(csrDER []byte, ttl time.Duration) error {
	if ttl > s.cfg.MaxTTL {
		return fmt.Errorf("%w: %v is longer than this control plane's maximum %v", ca.ErrTTL, ttl, s.cfg.MaxTTL)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return fmt.Errorf("%w: %v", ca.ErrInvalidCSR, err)
	}
	if len(csr.URIs) != 1 {
		return fmt.Errorf("%w: an X.509-SVID request has exactly one URI SAN, this has %d", ca.ErrInvalidCSR, len(csr.URIs))
	}
	want, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return fmt.Errorf("%w: URI SAN is not a SPIFFE ID: %v", ca.ErrInvalidCSR, err)
	}
	_, err = ca.ValidateCSR(csrDER, want)
	return err
}

// authenticate decides who the caller is: by credential when one is sent,
// otherwise by the SVID it presented on this connection.
func (s *Service) authenticate(ctx context.Context, cred *identityv1.Credential) (spiffeid.ID, string, error) {
	if cred.GetType() != "" {
		a, ok := s.auths[cred.GetType()]
		if !ok {
			return spiffeid.ID{}, "", status.Errorf(codes.InvalidArgument, "unknown credential type %q; this control plane accepts %v", cred.GetType(), s.credentialTypes())
		}
		id, err := a.Authenticate(ctx, cred.GetValue())
		if err != nil {
			if errors.Is(err, ErrUnauthenticated) {
				return spiffeid.ID{}, "", status.Error(codes.Unauthenticated, err.Error())
			}
			s.cfg.Log.Error("authenticator failed", "type", cred.GetType(), "err", err)
			return spiffeid.ID{}, "", status.Error(codes.Internal, "the credential could not be checked; see the control plane's log")
		}
		return id, cred.GetType(), nil
	}
	if s.cfg.RequireCredential {
		return spiffeid.ID{}, "", status.Errorf(codes.Unauthenticated, "this control plane renews certificates only against a credential (%v), not a certificate alone", s.credentialTypes())
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, "", status.Error(codes.Unauthenticated, "no credential and no client certificate: send a credential (e.g. a join token from 'trellis token create')")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, "", status.Error(codes.Unauthenticated, "no credential and no client certificate: send a credential (e.g. a join token from 'trellis token create')")
	}
	// The handshake verified the chain, but a connection can outlive its
	// certificate, and the bundle can change under it (a root retired):
	// verify again, now, against the bundle in force.
	id, _, err := x509svid.Verify(info.State.PeerCertificates, s.bundleSource(), x509svid.WithTime(s.cfg.Now()))
	if err != nil {
		return spiffeid.ID{}, "", status.Errorf(codes.Unauthenticated, "the client certificate is no longer valid (%v): bootstrap again with a credential", err)
	}
	if id == s.id {
		return spiffeid.ID{}, "", status.Error(codes.PermissionDenied, "the control plane's identity cannot be renewed through this API")
	}
	return id, "svid", nil
}

func (s *Service) credentialTypes() []string {
	return slices.Sorted(maps.Keys(s.auths))
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
