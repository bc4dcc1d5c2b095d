// Package ca is Trellis' certificate authority: it holds the trust bundle
// (one or more roots), an issuing intermediate that renews itself at two
// thirds of its lifetime, and signs workload X.509-SVIDs from CSRs, following
// the SPIFFE X509-SVID specification. Its state lives in one JSON file under a
// state directory; every change is a locked read-modify-write of that file,
// so the CLI (root rotation) and a running control plane can share it.
package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trellis-mesh/trellis/internal/certpem"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/statefile"
)

// Lifetimes and bounds.
const (
	DefaultRootTTL         = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL = 365 * 24 * time.Hour
	DefaultWorkloadTTL     = 24 * time.Hour
	MinWorkloadTTL         = 5 * time.Minute

	// backdate absorbs clock skew between the CA and verifiers.
	backdate = time.Minute
	// leafExpirySlack rounds the recorded upper bound of leaf expiry up, so
	// the bound is persisted about once an hour rather than on every
	// signature.
	leafExpirySlack = time.Hour
)

// ErrTTL is wrapped when a requested certificate lifetime is out of bounds.
var ErrTTL = errors.New("certificate lifetime out of bounds")

// Config configures a CA. Zero values get defaults.
type Config struct {
	// StateDir holds ca.json, ca.lock and bundle.pem.
	StateDir string
	Log      *slog.Logger
	// Now returns the current time; tests pass a fake clock.
	Now func() time.Time
	// IntermediateTTL is the lifetime of intermediates the CA generates.
	IntermediateTTL time.Duration
	// DefaultTTL is the workload certificate lifetime when a request gives none.
	DefaultTTL time.Duration
}

func (c *Config) setDefaults() {
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.IntermediateTTL == 0 {
		c.IntermediateTTL = DefaultIntermediateTTL
	}
	if c.DefaultTTL == 0 {
		c.DefaultTTL = DefaultWorkloadTTL
	}
}

// CA signs workload certificates. Its methods are safe for concurrent use.
type CA struct {
	cfg Config
	td  spiffeid.TrustDomain

	// cur is the state signing reads without locking; mutations replace it.
	cur atomic.Pointer[parsedState]
	// leafBound caches the recorded upper bound of leaf expiry under the
	// issuer's root, so most signatures skip the locked state update.
	leafBound atomic.Pointer[leafBound]
	// mu serializes mutations within this process; the file lock serializes
	// them across processes.
	mu sync.Mutex
	// stateMod is the modification time of ca.json when last read, so Reload
	// only re-parses after another process changed it.
	stateMod time.Time
}

// InitOptions chooses the root and intermediate of a new CA.
type InitOptions struct {
	TrustDomain string
	// RootCertPEM and RootKeyPEM supply the root. With neither, a root is
	// generated. RootKeyPEM may be empty only when an intermediate is given.
	RootCertPEM, RootKeyPEM []byte
	// IntermediateCertPEM and IntermediateKeyPEM supply the issuer; without
	// them an intermediate is generated from the root key.
	IntermediateCertPEM, IntermediateKeyPEM []byte
	// RootTTL is the lifetime of a generated root.
	RootTTL time.Duration
}

// Init creates a CA in cfg.StateDir. It refuses to overwrite an existing one.
func Init(cfg Config, opts InitOptions) (*CA, error) {
	cfg.setDefaults()
	if opts.TrustDomain == "" {
		return nil, errors.New("ca init: trust domain is empty")
	}
	td, err := spiffeid.TrustDomainFromString(opts.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("ca init: trust domain %q: %w (use a DNS-like name such as cluster.local)", opts.TrustDomain, err)
	}
	if opts.RootTTL == 0 {
		opts.RootTTL = DefaultRootTTL
	}
	if cfg.IntermediateTTL < 3*cfg.DefaultTTL {
		// Renewed at 2/3 of its life, the intermediate must still have a
		// whole workload lifetime left, or issuance fails before renewal.
		return nil, fmt.Errorf("ca init: intermediate lifetime %v is too short for %v workload certificates: use at least %v", cfg.IntermediateTTL, cfg.DefaultTTL, 3*cfg.DefaultTTL)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("ca init: create state directory: %w", err)
	}
	unlock, err := statefile.Lock(filepath.Join(cfg.StateDir, lockFileName))
	if err != nil {
		return nil, fmt.Errorf("ca init: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(cfg.StateDir, stateFileName)); err == nil {
		return nil, fmt.Errorf("ca init: %w: %s; use 'trellis ca inspect' to see it, or choose another --state-dir", ErrAlreadyInitialized, filepath.Join(cfg.StateDir, stateFileName))
	}
	now := cfg.Now()
	p := &parsedState{trustDomain: td.Name()}

	root := parsedRoot{status: rootActive}
	switch {
	case len(opts.RootCertPEM) == 0 && len(opts.RootKeyPEM) == 0:
		if len(opts.IntermediateCertPEM) > 0 {
			return nil, errors.New("ca init: an intermediate needs the root it chains to: pass --root-cert too")
		}
		root.cert, root.key, err = newRoot(td, now, opts.RootTTL)
		if err != nil {
			return nil, fmt.Errorf("ca init: %w", err)
		}
	case len(opts.RootCertPEM) == 0:
		return nil, errors.New("ca init: a root key was given without its certificate: pass --root-cert")
	default:
		root.cert, root.key, err = parseSuppliedCA("root", opts.RootCertPEM, opts.RootKeyPEM, now)
		if err != nil {
			return nil, fmt.Errorf("ca init: %w", err)
		}
		if root.key == nil && len(opts.IntermediateCertPEM) == 0 {
			return nil, errors.New("ca init: without the root key Trellis cannot sign an intermediate: pass --root-key, or --intermediate-cert and --intermediate-key")
		}
	}
	p.roots = []parsedRoot{root}

	if len(opts.IntermediateCertPEM) > 0 || len(opts.IntermediateKeyPEM) > 0 {
		cert, key, err := parseSuppliedCA("intermediate", opts.IntermediateCertPEM, opts.IntermediateKeyPEM, now)
		if err != nil {
			return nil, fmt.Errorf("ca init: %w", err)
		}
		if key == nil {
			return nil, errors.New("ca init: --intermediate-cert needs --intermediate-key")
		}
		if err := cert.CheckSignatureFrom(root.cert); err != nil {
			return nil, fmt.Errorf("ca init: the intermediate is not signed by the root: %w", err)
		}
		p.issuer = parsedIssuer{cert: cert, key: key, root: root.cert, supplied: true}
	} else {
		cert, key, err := newIntermediate(td, root.cert, root.key, now, cfg.IntermediateTTL)
		if err != nil {
			return nil, fmt.Errorf("ca init: %w", err)
		}
		p.issuer = parsedIssuer{cert: cert, key: key, root: root.cert}
	}
	if err := writeState(cfg.StateDir, p); err != nil {
		return nil, fmt.Errorf("ca init: %w", err)
	}
	c := &CA{cfg: cfg, td: td}
	c.install(p)
	c.recordMod()
	cfg.Log.Info("certificate authority created", "trustDomain", td.Name(), "root", fingerprint(root.cert), "stateDir", cfg.StateDir)
	return c, nil
}

// Load opens the CA in cfg.StateDir.
func Load(cfg Config) (*CA, error) {
	cfg.setDefaults()
	p, err := readState(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	td, err := spiffeid.TrustDomainFromString(p.trustDomain)
	if err != nil {
		return nil, fmt.Errorf("CA state file %s: trust domain %q: %w", filepath.Join(cfg.StateDir, stateFileName), p.trustDomain, err)
	}
	c := &CA{cfg: cfg, td: td}
	c.install(p)
	c.recordMod()
	return c, nil
}

func (c *CA) install(p *parsedState) {
	c.cur.Store(p)
	if r := c.rootOf(p); r != nil {
		c.leafBound.Store(&leafBound{root: r.cert, until: r.leavesValidUntil})
	}
}

// rootOf returns the root entry the current issuer chains to.
func (c *CA) rootOf(p *parsedState) *parsedRoot {
	for i := range p.roots {
		if p.roots[i].cert.Equal(p.issuer.root) {
			return &p.roots[i]
		}
	}
	return nil
}

func (c *CA) recordMod() {
	if fi, err := os.Stat(filepath.Join(c.cfg.StateDir, stateFileName)); err == nil {
		c.stateMod = fi.ModTime()
	}
}

// TrustDomain is the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Bundle returns every root workloads must trust, the active one included.
func (c *CA) Bundle() []*x509.Certificate { return c.cur.Load().bundle() }

// Issuer returns the current issuing intermediate.
func (c *CA) Issuer() *x509.Certificate { return c.cur.Load().issuer.cert }

// Sign validates a CSR for id and returns the certificate chain, leaf first
// followed by the intermediate. ttl 0 means the configured default.
func (c *CA) Sign(csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("sign: %s is not in trust domain %s", id, c.td)
	}
	csr, err := ValidateCSR(csrDER, id)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return c.issue(csr.PublicKey, id, ttl, nil, nil)
}

// SignPublicKey issues an SVID for a key the caller already holds; the
// control plane uses it for its own serving certificate, where no CSR
// crosses a trust boundary.
func (c *CA) SignPublicKey(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := checkPublicKey(pub); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return c.issue(pub, id, ttl, nil, nil)
}

// SignServing signs a certificate for id that also names the host names
// and addresses a client checks by name, such as a Kubernetes API server
// calling a webhook: https://trellis-control-plane.trellis-system.svc.
func (c *CA) SignServing(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration, dnsNames []string, ips []net.IP) ([]*x509.Certificate, error) {
	if err := checkPublicKey(pub); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return c.issue(pub, id, ttl, dnsNames, ips)
}

func (c *CA) issue(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration, dnsNames []string, ips []net.IP) ([]*x509.Certificate, error) {
	p := c.cur.Load()
	now := c.cfg.Now()
	if ttl == 0 {
		ttl = c.cfg.DefaultTTL
	}
	if now.Before(p.issuer.cert.NotBefore) {
		return nil, fmt.Errorf("sign: the issuing intermediate is not valid until %s: check this machine's clock", p.issuer.cert.NotBefore.UTC().Format(time.RFC3339))
	}
	if err := CheckTTL(ttl, now, p.issuer.cert.NotAfter); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	notBefore := now.Add(-backdate)
	if notBefore.Before(p.issuer.cert.NotBefore) {
		notBefore = p.issuer.cert.NotBefore
	}
	notAfter := now.Add(ttl)
	// Record the bound first: a certificate whose expiry the CA has not
	// recorded could outlive its root's retirement.
	if err := c.noteLeafExpiry(p.issuer.root, notAfter); err != nil {
		return nil, fmt.Errorf("sign: record the certificate's expiry: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	usage := x509.KeyUsageDigitalSignature
	if _, isRSA := pub.(*rsa.PublicKey); isRSA {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.issuer.cert, pub, p.issuer.key)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return []*x509.Certificate{leaf, p.issuer.cert}, nil
}

// CheckTTL reports whether a workload certificate lifetime is allowed at now
// under an intermediate that expires at issuerNotAfter.
func CheckTTL(ttl time.Duration, now, issuerNotAfter time.Time) error {
	if ttl < MinWorkloadTTL {
		return fmt.Errorf("%w: %v is shorter than the minimum %v", ErrTTL, ttl, MinWorkloadTTL)
	}
	if remaining := issuerNotAfter.Sub(now); ttl > remaining {
		return fmt.Errorf("%w: %v is longer than the issuing intermediate's remaining lifetime %v; ask for at most that", ErrTTL, ttl, remaining.Truncate(time.Second))
	}
	return nil
}

// leafBound is the recorded bound on leaf expiry under one root.
type leafBound struct {
	root  *x509.Certificate
	until time.Time
}

// noteLeafExpiry raises the recorded bound on the expiry of leaves issued
// under root when notAfter passes it. The bound is persisted with slack, so
// this happens about once an hour rather than on every signature.
func (c *CA) noteLeafExpiry(root *x509.Certificate, notAfter time.Time) error {
	if b := c.leafBound.Load(); b != nil && b.root.Equal(root) && !notAfter.After(b.until) {
		return nil
	}
	return c.mutate(func(p *parsedState) (bool, error) {
		for i := range p.roots {
			r := &p.roots[i]
			if !r.cert.Equal(root) {
				continue
			}
			if !notAfter.After(r.leavesValidUntil) {
				return false, nil
			}
			r.leavesValidUntil = notAfter.Add(leafExpirySlack)
			return true, nil
		}
		return false, errors.New("the issuing root has been retired; retry to be issued under the new root")
	})
}

// mutate applies fn to the latest on-disk state under the cross-process lock
// and persists the result when fn reports a change. It is how every change
// to the CA is made, so a CLI command and a running control plane never lose
// each other's updates.
func (c *CA) mutate(fn func(p *parsedState) (changed bool, err error)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	unlock, err := statefile.Lock(filepath.Join(c.cfg.StateDir, lockFileName))
	if err != nil {
		return err
	}
	defer unlock()
	p, err := readState(c.cfg.StateDir)
	if err != nil {
		return err
	}
	changed, err := fn(p)
	if err != nil || !changed {
		if err == nil {
			c.install(p)
			c.recordMod()
		}
		return err
	}
	if err := writeState(c.cfg.StateDir, p); err != nil {
		return err
	}
	c.install(p)
	c.recordMod()
	return nil
}

// Reload re-reads the state file if another process changed it (a root
// rotation step run from the CLI). It reports whether anything changed.
func (c *CA) Reload() (bool, error) { return c.reload(false) }

// Replaced reads the state file that was just replaced whole (by another
// control plane's CA, taken from its Secret), whatever its modification
// time says: two writes within the clock's resolution look the same.
func (c *CA) Replaced() (bool, error) { return c.reload(true) }

func (c *CA) reload(force bool) (bool, error) {
	fi, err := os.Stat(filepath.Join(c.cfg.StateDir, stateFileName))
	if err != nil {
		return false, fmt.Errorf("reload CA state: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !force && fi.ModTime().Equal(c.stateMod) {
		return false, nil
	}
	p, err := readState(c.cfg.StateDir)
	if err != nil {
		return false, err
	}
	old := c.cur.Load()
	c.install(p)
	c.stateMod = fi.ModTime()
	return !reflect.DeepEqual(fingerprints(old), fingerprints(p)), nil
}

func fingerprints(p *parsedState) []string {
	out := []string{fingerprint(p.issuer.cert)}
	for _, r := range p.roots {
		out = append(out, r.status+":"+fingerprint(r.cert))
	}
	return out
}

// RotateIntermediateIfDue replaces the issuing intermediate once two thirds
// of its lifetime have passed. The old intermediate stays valid until it
// expires, so certificates chained to it keep verifying. An intermediate the
// operator supplied cannot be renewed here; Status reports it.
func (c *CA) RotateIntermediateIfDue() (rotated bool, err error) {
	p := c.cur.Load()
	now := c.cfg.Now()
	if !ShouldRotate(now, p.issuer.cert.NotBefore, p.issuer.cert.NotAfter) || p.issuer.supplied {
		return false, nil
	}
	err = c.mutate(func(p *parsedState) (bool, error) {
		if !ShouldRotate(now, p.issuer.cert.NotBefore, p.issuer.cert.NotAfter) || p.issuer.supplied {
			return false, nil // another process rotated it first
		}
		root := p.activeRoot()
		if root.key == nil {
			return false, nil
		}
		cert, key, err := newIntermediate(c.td, root.cert, root.key, now, c.cfg.IntermediateTTL)
		if err != nil {
			return false, err
		}
		p.issuer = parsedIssuer{cert: cert, key: key, root: root.cert}
		rotated = true
		return true, nil
	})
	if err != nil {
		return false, fmt.Errorf("rotate intermediate: %w", err)
	}
	if rotated {
		c.cfg.Log.Info("issuing intermediate renewed", "intermediate", fingerprint(c.Issuer()), "notAfter", c.Issuer().NotAfter)
	}
	return rotated, nil
}

// Run keeps the CA current until ctx ends: it picks up changes other
// processes make to the state and renews the intermediate when due. Errors
// are logged and retried at the next tick; the CA keeps signing with what it
// has.
func (c *CA) Run(ctx context.Context, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if changed, err := c.Reload(); err != nil {
			c.cfg.Log.Error("CA state reload failed; still signing with the state loaded before", "err", err)
		} else if changed {
			c.cfg.Log.Info("CA state changed on disk; now issuing with", "intermediate", fingerprint(c.Issuer()))
		}
		if _, err := c.RotateIntermediateIfDue(); err != nil {
			c.cfg.Log.Error("intermediate renewal failed; will retry", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func newSerial() (*big.Int, error) {
	// 128 random bits: unique without coordination between processes, and
	// unpredictable as the CA/Browser Forum asks.
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return serial.Add(serial, big.NewInt(1)), nil
}

func newRoot(td spiffeid.TrustDomain, now time.Time, ttl time.Duration) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate root key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Trellis"}, CommonName: "Trellis root CA " + td.Name() + " " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func newIntermediate(td spiffeid.TrustDomain, root *x509.Certificate, rootKey crypto.Signer, now time.Time, ttl time.Duration) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate intermediate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	notBefore, notAfter := now.Add(-backdate), now.Add(ttl)
	if notAfter.After(root.NotAfter) {
		notAfter = root.NotAfter // a child never outlives its parent
	}
	if notBefore.Before(root.NotBefore) {
		notBefore = root.NotBefore
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Trellis"}, CommonName: "Trellis intermediate CA " + td.Name() + " " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // it signs leaves only
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, key.Public(), rootKey)
	if err != nil {
		return nil, nil, fmt.Errorf("create intermediate certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

// parseSuppliedCA parses an operator-supplied CA certificate and optional key
// and checks they can serve: a CA certificate allowed to sign certificates,
// valid now, with a matching key.
func parseSuppliedCA(what string, certPEM, keyPEM []byte, now time.Time) (*x509.Certificate, crypto.Signer, error) {
	certs, err := certpem.ParseCerts(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s certificate: %w", what, err)
	}
	if len(certs) != 1 {
		return nil, nil, fmt.Errorf("%s certificate: the file holds %d certificates; give exactly one", what, len(certs))
	}
	cert := certs[0]
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, nil, fmt.Errorf("%s certificate %q is not a CA allowed to sign certificates (needs basicConstraints CA:TRUE and keyUsage keyCertSign)", what, cert.Subject)
	}
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil, nil, fmt.Errorf("%s certificate %q is not valid now (valid %s to %s)", what, cert.Subject, cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339))
	}
	// A weak root is weak whether or not its key is handed over.
	if err := checkPublicKey(cert.PublicKey); err != nil {
		return nil, nil, fmt.Errorf("%s certificate: %w", what, err)
	}
	if len(keyPEM) == 0 {
		return cert, nil, nil
	}
	key, err := certpem.ParseKey(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s key: %w", what, err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, nil, fmt.Errorf("%s key does not match the %s certificate: check you passed the pair", what, what)
	}
	return cert, key, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}
