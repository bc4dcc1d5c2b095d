package ca

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"time"
)

// WarnWithin is how far ahead Status warns of an expiring root or intermediate.
const WarnWithin = 30 * 24 * time.Hour

// CertStatus describes one CA certificate for operators.
type CertStatus struct {
	Role        string    `json:"role"` // "root" or "intermediate"
	State       string    `json:"state,omitempty"`
	Subject     string    `json:"subject"`
	Fingerprint string    `json:"sha256"`
	NotBefore   time.Time `json:"notBefore"`
	NotAfter    time.Time `json:"notAfter"`
	KeyHeld     bool      `json:"keyHeld"`
}

// Status is what 'trellis ca inspect' shows.
type Status struct {
	TrustDomain  string       `json:"trustDomain"`
	Roots        []CertStatus `json:"roots"`
	Intermediate CertStatus   `json:"intermediate"`
	// IntermediateRenewsAt is when the intermediate is replaced, if Trellis
	// can replace it.
	IntermediateRenewsAt *time.Time `json:"intermediateRenewsAt,omitempty"`
	Warnings             []string   `json:"warnings"`
}

// Status reports the CA's certificates at now, with warnings for anything
// that expires within WarnWithin or cannot be renewed automatically.
func (c *CA) Status() Status {
	p := c.cur.Load()
	now := c.cfg.Now()
	s := Status{TrustDomain: p.trustDomain, Warnings: []string{}}
	for _, r := range p.roots {
		s.Roots = append(s.Roots, certStatus("root", r.status, r.cert, r.key != nil))
		if left := r.cert.NotAfter.Sub(now); left < WarnWithin {
			s.Warnings = append(s.Warnings, fmt.Sprintf("root %s expires in %s: rotate it with 'trellis ca rotate-root prepare'", fingerprint(r.cert)[:16], left.Round(time.Hour)))
		}
	}
	s.Intermediate = certStatus("intermediate", "", p.issuer.cert, true)
	if p.issuer.supplied {
		if left := p.issuer.cert.NotAfter.Sub(now); left < WarnWithin {
			s.Warnings = append(s.Warnings, fmt.Sprintf("the supplied intermediate expires in %s and Trellis cannot renew it without the root key: issue a new one from your root and install it", left.Round(time.Hour)))
		}
	} else {
		at := RotationTime(p.issuer.cert.NotBefore, p.issuer.cert.NotAfter)
		s.IntermediateRenewsAt = &at
		if p.activeRoot().key == nil {
			s.Warnings = append(s.Warnings, "the active root's key is not held: the intermediate cannot be renewed automatically")
		}
	}
	if left := p.issuer.cert.NotAfter.Sub(now); left < MinWorkloadTTL {
		s.Warnings = append(s.Warnings, "the intermediate has expired or is about to: no workload certificate can be issued")
	}
	return s
}

func certStatus(role, state string, cert *x509.Certificate, keyHeld bool) CertStatus {
	return CertStatus{
		Role: role, State: state, Subject: cert.Subject.String(), Fingerprint: fingerprint(cert),
		NotBefore: cert.NotBefore.UTC(), NotAfter: cert.NotAfter.UTC(), KeyHeld: keyHeld,
	}
}

// fingerprint is the SHA-256 of the certificate, hex, as openssl prints it
// without colons.
func fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:])
}
