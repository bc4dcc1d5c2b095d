package identity

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Holder publishes the current SVID to TLS. Handshakes read it through an
// atomic pointer, so swapping in a renewed certificate affects only new
// handshakes and never an established connection.
type Holder struct {
	cur atomic.Pointer[SVID]
}

// Set replaces the current SVID.
func (h *Holder) Set(s *SVID) { h.cur.Store(s) }

// Current returns the current SVID, or nil before the first one.
func (h *Holder) Current() *SVID { return h.cur.Load() }

// GetCertificate serves the SVID on the server side of a handshake.
func (h *Holder) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s := h.cur.Load()
	if s == nil {
		return nil, ErrNoSVID
	}
	return s.TLSCertificate(), nil
}

// GetClientCertificate serves the SVID on the client side of a handshake.
func (h *Holder) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	s := h.cur.Load()
	if s == nil {
		return nil, ErrNoSVID
	}
	return s.TLSCertificate(), nil
}

// GetX509SVID implements go-spiffe's x509svid.Source, so go-spiffe's
// tlsconfig helpers can use a Holder directly.
func (h *Holder) GetX509SVID() (*x509svid.SVID, error) {
	s := h.cur.Load()
	if s == nil {
		return nil, ErrNoSVID
	}
	return &x509svid.SVID{ID: s.ID, Certificates: s.Chain, PrivateKey: s.Key}, nil
}

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source with
// the bundle that came with the current SVID.
func (h *Holder) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s := h.cur.Load()
	if s == nil {
		return nil, ErrNoSVID
	}
	if s.ID.TrustDomain() != td {
		return nil, fmt.Errorf("no trust bundle for trust domain %q", td)
	}
	return x509bundle.FromX509Authorities(td, s.Bundle), nil
}
