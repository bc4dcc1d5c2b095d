// Package identity is the workload side of Trellis identity: it holds the
// workload's current X.509-SVID and trust bundle behind an atomic pointer,
// serves them to crypto/tls, and (Source) obtains and renews them from the
// identity service with a key generated here that never leaves the process.
package identity

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/internal/certpem"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trellis-mesh/trellis/internal/statefile"
)

// ErrNoSVID is returned while no certificate has been obtained yet.
var ErrNoSVID = errors.New("no workload certificate yet")

// SVID is a workload certificate with its key and the trust bundle that came
// with it. It is immutable once made; rotation replaces the whole value.
type SVID struct {
	ID     spiffeid.ID
	Chain  []*x509.Certificate // leaf first
	Key    crypto.Signer
	Bundle []*x509.Certificate // roots
	tls    tls.Certificate
}

// NewSVID checks that chain, key and bundle belong together (the chain
// verifies against the bundle at now and the key matches the leaf) and
// returns the SVID.
func NewSVID(chain []*x509.Certificate, key crypto.Signer, bundle []*x509.Certificate, now time.Time) (*SVID, error) {
	if len(chain) == 0 {
		return nil, errors.New("empty certificate chain")
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(chain[0].PublicKey) {
		return nil, errors.New("the private key does not match the certificate")
	}
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return nil, fmt.Errorf("certificate is not an X.509-SVID: %w", err)
	}
	if _, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(id.TrustDomain(), bundle), x509svid.WithTime(now)); err != nil {
		return nil, fmt.Errorf("certificate does not verify against the trust bundle: %w", err)
	}
	s := &SVID{ID: id, Chain: chain, Key: key, Bundle: bundle}
	s.tls = tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		s.tls.Certificate = append(s.tls.Certificate, c.Raw)
	}
	return s, nil
}

// NotBefore and NotAfter bound the leaf's validity.
func (s *SVID) NotBefore() time.Time { return s.Chain[0].NotBefore }

// NotAfter is the leaf's expiry.
func (s *SVID) NotAfter() time.Time { return s.Chain[0].NotAfter }

// TLSCertificate returns the SVID as a crypto/tls certificate.
func (s *SVID) TLSCertificate() *tls.Certificate { return &s.tls }

// File names WriteFiles and LoadFiles use, the ones curl and openssl users
// expect.
const (
	KeyFile    = "key.pem"
	CertFile   = "cert.pem"
	BundleFile = "bundle.pem"
)

// WriteFiles writes key.pem (0600), cert.pem (the chain) and bundle.pem to dir.
func (s *SVID) WriteFiles(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("write SVID: %w", err)
	}
	keyPEM, err := certpem.EncodeKey(s.Key)
	if err != nil {
		return fmt.Errorf("write SVID: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{KeyFile, keyPEM, 0o600},
		{CertFile, certpem.EncodeCerts(s.Chain...), 0o644},
		{BundleFile, certpem.EncodeCerts(s.Bundle...), 0o644},
	} {
		if err := statefile.WriteAtomic(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return fmt.Errorf("write SVID: %w", err)
		}
	}
	return nil
}

// LoadFiles reads an SVID written by WriteFiles (or by hand, for static use).
func LoadFiles(dir string, now time.Time) (*SVID, error) {
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("load SVID: %w", err)
		}
		return b, nil
	}
	keyPEM, err := read(KeyFile)
	if err != nil {
		return nil, err
	}
	certPEM, err := read(CertFile)
	if err != nil {
		return nil, err
	}
	bundlePEM, err := read(BundleFile)
	if err != nil {
		return nil, err
	}
	key, err := certpem.ParseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load SVID: %s: %w", filepath.Join(dir, KeyFile), err)
	}
	chain, err := certpem.ParseCerts(certPEM)
	if err != nil {
		return nil, fmt.Errorf("load SVID: %s: %w", filepath.Join(dir, CertFile), err)
	}
	bundle, err := certpem.ParseCerts(bundlePEM)
	if err != nil {
		return nil, fmt.Errorf("load SVID: %s: %w", filepath.Join(dir, BundleFile), err)
	}
	s, err := NewSVID(chain, key, bundle, now)
	if err != nil {
		return nil, fmt.Errorf("load SVID from %s: %w", dir, err)
	}
	return s, nil
}
