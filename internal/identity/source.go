package identity

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
	"math"
	mathrand "math/rand/v2"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/durationpb"

	identityv1 "github.com/trellis-mesh/trellis/api/identity/v1"
)

// Renewal timing. Renewing at ~70% of the lifetime leaves 30% to ride out a
// control-plane outage; the jitter spreads the renewals of workloads that
// started together.
const (
	renewPermille  = 700
	jitterPermille = 50 // ± share of the lifetime
	backoffBase    = time.Second
	backoffMax     = time.Minute
	// maxWait caps each sleep so that a suspended machine or a clock jump
	// is noticed within a minute rather than at the old deadline.
	maxWait = time.Minute
	// fetchTimeout bounds one request, so a server that accepts and never
	// answers cannot stall renewal.
	fetchTimeout = 30 * time.Second
	// minRenewGap keeps a certificate that looks due at once (the client's
	// clock far ahead of the CA's, or a tiny TTL) from being renewed in a
	// tight loop.
	minRenewGap = 30 * time.Second
)

// RenewAt is when a certificate valid from notBefore to notAfter should be
// renewed. jitter in [-1, 1] moves it by up to 5% of the lifetime.
func RenewAt(notBefore, notAfter time.Time, jitter float64) time.Time {
	jitter = math.Max(-1, math.Min(1, jitter))
	// Per-mille integer arithmetic keeps the result exact and free of
	// overflow for lifetimes of years.
	permille := time.Duration(renewPermille + math.Round(jitter*jitterPermille))
	life := notAfter.Sub(notBefore)
	return notBefore.Add(life/1000*permille + life%1000*permille/1000)
}

// Backoff is the wait before retry number attempt (0-based) after failures,
// doubling from one second up to a minute; jitter in [0, 1) adds up to 20%.
func Backoff(attempt int, jitter float64) time.Duration {
	d := backoffMax
	if attempt < 6 {
		d = min(backoffBase<<attempt, backoffMax)
	}
	return d + time.Duration(float64(d)*0.2*jitter)
}

// CredentialJoinToken is the credential type of bootstrap join tokens
// ('trellis token create').
const CredentialJoinToken = "join-token"

// Config configures a Source.
type Config struct {
	Log *slog.Logger
	// Now is the source's clock; nil means time.Now.
	Now func() time.Time
	// Addr is the identity service's address (host:port).
	Addr string
	// ID is the identity to request; the credential must entitle to it.
	ID spiffeid.ID
	// ServerID is the SPIFFE ID the identity service must present.
	ServerID spiffeid.ID
	// Bundle is the trust bundle used to verify the identity service until
	// the first SVID (which brings its own bundle) arrives.
	Bundle []*x509.Certificate
	// Credential authenticates the first request, and any request after the
	// current SVID has expired.
	Credential *identityv1.Credential
	// CredentialFile, instead of Credential, holds a credential of type
	// CredentialType, read again at each use: Kubernetes refreshes a
	// projected service account token in place before it expires.
	CredentialFile, CredentialType string
	// TTL asks for a certificate lifetime; zero takes the server's default.
	TTL time.Duration
	// DialOptions are added to the gRPC dial (tests use them).
	DialOptions []grpc.DialOption
}

// Source obtains the workload's SVID from the identity service and keeps it
// renewed. Its embedded Holder hands the current SVID to TLS.
type Source struct {
	Holder
	cfg   Config
	ready chan struct{}
}

// NewSource returns a Source; call Run to start it.
func NewSource(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Addr == "" {
		return nil, errors.New("identity source: no identity service address")
	}
	if cfg.ID.IsZero() || cfg.ServerID.IsZero() {
		return nil, errors.New("identity source: the workload ID and the identity service's ID are both required")
	}
	if len(cfg.Bundle) == 0 {
		return nil, errors.New("identity source: no trust bundle to verify the identity service with")
	}
	return &Source{cfg: cfg, ready: make(chan struct{})}, nil
}

// Ready is closed once the first SVID is held.
func (s *Source) Ready() <-chan struct{} { return s.ready }

// SecondsToExpiry reports how long the current certificate stays valid
// (negative once expired); it is the number to alert on.
func (s *Source) SecondsToExpiry() float64 {
	cur := s.Current()
	if cur == nil {
		return 0
	}
	return cur.NotAfter().Sub(s.cfg.Now()).Seconds()
}

// Run obtains the first SVID and renews it until ctx ends. Failures are
// retried with backoff; the current certificate stays in use until it
// expires, so a control-plane outage shorter than the remaining 30% of the
// lifetime goes unnoticed by the workload.
func (s *Source) Run(ctx context.Context) error {
	failures := 0
	var renewAt time.Time
	for {
		now := s.cfg.Now()
		cur := s.Current()
		if cur == nil || !now.Before(renewAt) {
			fctx, cancel := context.WithTimeout(ctx, fetchTimeout)
			err := s.Fetch(fctx)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				wait := Backoff(failures, mathrand.Float64())
				failures++
				s.logFailure(err, cur, now, wait)
				if !sleep(ctx, wait) {
					return nil
				}
				continue
			}
			failures = 0
			cur = s.Current()
			renewAt = RenewAt(cur.NotBefore(), cur.NotAfter(), 2*mathrand.Float64()-1)
			if earliest := s.cfg.Now().Add(minRenewGap); renewAt.Before(earliest) {
				s.cfg.Log.Warn("the new certificate is already due for renewal: is this machine's clock ahead of the control plane's?", "notBefore", cur.NotBefore().UTC(), "notAfter", cur.NotAfter().UTC())
				renewAt = earliest
			}
			s.cfg.Log.Info("workload certificate obtained", "id", cur.ID, "notAfter", cur.NotAfter().UTC(), "renewAt", renewAt.UTC())
		}
		// Sleep in bounded steps and re-read the clock, so a missed timer
		// (suspend, clock jump) forces the renewal instead of skipping it.
		if !sleep(ctx, min(renewAt.Sub(s.cfg.Now()), maxWait)) {
			return nil
		}
	}
}

func (s *Source) logFailure(err error, cur *SVID, now time.Time, wait time.Duration) {
	switch {
	case cur == nil:
		s.cfg.Log.Error("cannot obtain a workload certificate; retrying", "err", err, "retryIn", wait.Round(time.Millisecond))
	case now.After(cur.NotAfter()):
		s.cfg.Log.Error("workload certificate EXPIRED and renewal fails; mTLS connections will fail", "err", err, "expiredAt", cur.NotAfter().UTC(), "retryIn", wait.Round(time.Millisecond))
	default:
		s.cfg.Log.Warn("certificate renewal failed; still using the current certificate", "err", err, "expiresIn", cur.NotAfter().Sub(now).Round(time.Second), "retryIn", wait.Round(time.Millisecond))
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// CredentialKubernetes is the credential type of Kubernetes service
// account tokens (audience "trellis"), which the control plane checks with
// a TokenReview.
const CredentialKubernetes = "kubernetes-service-account-token"

// credential returns the credential to authenticate with.
func (s *Source) credential() (*identityv1.Credential, error) {
	if s.cfg.CredentialFile != "" {
		data, err := os.ReadFile(s.cfg.CredentialFile)
		if err != nil {
			return nil, fmt.Errorf("credential: %w", err)
		}
		tok := strings.TrimSpace(string(data))
		if tok == "" {
			return nil, fmt.Errorf("credential file %s is empty", s.cfg.CredentialFile)
		}
		return &identityv1.Credential{Type: s.cfg.CredentialType, Value: tok}, nil
	}
	if s.cfg.Credential == nil {
		return nil, errors.New("no valid certificate to renew with and no credential configured")
	}
	return s.cfg.Credential, nil
}

// Fetch makes one request: a new key, a CSR for the configured ID, signed by
// the identity service. It authenticates with the current SVID while that is
// valid and with the configured credential otherwise. On success the new
// SVID replaces the current one.
func (s *Source) Fetch(ctx context.Context) error {
	now := s.cfg.Now()
	cur := s.Current()
	useSVID := cur != nil && now.Before(cur.NotAfter())
	req := &identityv1.SignCertificateRequest{}
	// A Kubernetes token proves the pod still exists: it goes with every
	// request, renewals included.
	if !useSVID || s.cfg.CredentialType == CredentialKubernetes {
		cred, err := s.credential()
		if err != nil {
			return fmt.Errorf("fetch SVID: %w", err)
		}
		req.Credential = cred
	}
	if s.cfg.TTL > 0 {
		req.Ttl = durationpb.New(s.cfg.TTL)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("fetch SVID: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{s.cfg.ID.URL()}}, key)
	if err != nil {
		return fmt.Errorf("fetch SVID: %w", err)
	}
	req.Csr = csr

	// A fresh connection per request: renewals are hours apart, and a new
	// handshake is what presents the current SVID as client certificate.
	conn, err := grpc.NewClient(s.cfg.Addr, append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(s.clientTLS(useSVID)))}, s.cfg.DialOptions...)...)
	if err != nil {
		return fmt.Errorf("fetch SVID: %w", err)
	}
	defer conn.Close()
	resp, err := identityv1.NewIdentityClient(conn).SignCertificate(ctx, req)
	if err != nil {
		return fmt.Errorf("fetch SVID from %s: %w", s.cfg.Addr, err)
	}
	chain, err := parseDERs(resp.GetCertificateChain())
	if err != nil {
		return fmt.Errorf("fetch SVID: certificate chain: %w", err)
	}
	bundle, err := parseDERs(resp.GetTrustBundle())
	if err != nil {
		return fmt.Errorf("fetch SVID: trust bundle: %w", err)
	}
	svid, err := NewSVID(chain, key, bundle, s.cfg.Now())
	if err != nil {
		return fmt.Errorf("fetch SVID: the identity service returned an unusable certificate: %w", err)
	}
	if svid.ID != s.cfg.ID {
		return fmt.Errorf("fetch SVID: asked for %s, got %s", s.cfg.ID, svid.ID)
	}
	s.Set(svid)
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
	return nil
}

// clientTLS verifies the identity service by its SPIFFE ID against the
// current bundle (or the configured one before the first SVID), and presents
// the current SVID when renewing with it.
func (s *Source) clientTLS(presentSVID bool) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13}
	tlsconfig.HookTLSClientConfig(cfg, bundleSourceFunc(s.bundleFor), tlsconfig.AuthorizeID(s.cfg.ServerID))
	if presentSVID {
		cfg.GetClientCertificate = s.GetClientCertificate
	}
	return cfg
}

func (s *Source) bundleFor(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if cur := s.Current(); cur != nil {
		return s.GetX509BundleForTrustDomain(td)
	}
	return x509bundle.FromX509Authorities(td, s.cfg.Bundle), nil
}

// bundleSourceFunc adapts a function to go-spiffe's x509bundle.Source.
type bundleSourceFunc func(spiffeid.TrustDomain) (*x509bundle.Bundle, error)

func (f bundleSourceFunc) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return f(td)
}

func parseDERs(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("empty")
	}
	out := make([]*x509.Certificate, 0, len(ders))
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
