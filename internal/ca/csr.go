package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrInvalidCSR is wrapped by every CSR rejection so callers (the identity
// service) can map it to an InvalidArgument status.
var ErrInvalidCSR = errors.New("invalid certificate signing request")

var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// Minimum RSA modulus we sign for; smaller keys are weak.
const minRSABits = 2048

// ValidateCSR parses a DER PKCS#10 request and checks that it may be signed
// as an X.509-SVID for want: a valid self-signature, exactly one URI SAN equal
// to want, no other names, no CA rights, and a strong key. Everything else in
// the request (subject, other extensions) is ignored: the certificate is built
// from our own template, never from the request.
func ValidateCSR(der []byte, want spiffeid.ID) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature does not verify: %v", ErrInvalidCSR, err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidCSR, err)
	}
	switch len(csr.URIs) {
	case 0:
		return nil, fmt.Errorf("%w: no URI SAN: put the SPIFFE ID %s in the request", ErrInvalidCSR, want)
	case 1:
	default:
		return nil, fmt.Errorf("%w: %d URI SANs, an X.509-SVID has exactly one", ErrInvalidCSR, len(csr.URIs))
	}
	got, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("%w: URI SAN %q is not a SPIFFE ID: %v", ErrInvalidCSR, csr.URIs[0], err)
	}
	if got != want {
		return nil, fmt.Errorf("%w: asks for %s but the caller authenticated as %s", ErrInvalidCSR, got, want)
	}
	if len(csr.DNSNames)+len(csr.EmailAddresses)+len(csr.IPAddresses) > 0 {
		return nil, fmt.Errorf("%w: DNS, e-mail or IP SANs are not issued; request only the SPIFFE ID", ErrInvalidCSR)
	}
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(oidBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			if _, err := asn1.Unmarshal(ext.Value, &bc); err != nil {
				return nil, fmt.Errorf("%w: malformed basicConstraints extension: %v", ErrInvalidCSR, err)
			}
			if bc.IsCA {
				return nil, fmt.Errorf("%w: asks for CA rights (basicConstraints CA:TRUE); workloads get leaf certificates only", ErrInvalidCSR)
			}
		case ext.Id.Equal(oidKeyUsage):
			var bits asn1.BitString
			if _, err := asn1.Unmarshal(ext.Value, &bits); err != nil {
				return nil, fmt.Errorf("%w: malformed keyUsage extension: %v", ErrInvalidCSR, err)
			}
			// Bit 5 is keyCertSign, bit 6 cRLSign (RFC 5280 4.2.1.3).
			if bits.At(5) == 1 || bits.At(6) == 1 {
				return nil, fmt.Errorf("%w: asks for certificate or CRL signing key usage; workloads get leaf certificates only", ErrInvalidCSR)
			}
		}
	}
	return csr, nil
}

// checkPublicKey rejects key types and sizes we do not consider strong.
func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return nil
		}
		return fmt.Errorf("weak ECDSA curve %s: use P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return fmt.Errorf("weak RSA key of %d bits: use at least %d bits, or ECDSA P-256", k.N.BitLen(), minRSABits)
		}
		return nil
	case ed25519.PublicKey:
		return nil
	default:
		return fmt.Errorf("unsupported public key type %T: use ECDSA P-256", pub)
	}
}
