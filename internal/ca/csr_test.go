package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
)

func TestValidateCSR(t *testing.T) {
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	bcCA, _ := asn1.Marshal(struct{ IsCA bool }{true})
	bcLeaf, _ := asn1.Marshal(struct{}{})
	kuCertSign, _ := asn1.Marshal(asn1.BitString{Bytes: []byte{0x04}, BitLength: 6}) // bit 5
	uri := func(s string) []*url.URL { u, _ := url.Parse(s); return []*url.URL{u} }

	for _, tc := range []struct {
		name    string
		key     crypto.Signer
		tmpl    x509.CertificateRequest
		corrupt bool
		wantErr string // substring; empty = valid
	}{
		{name: "valid ECDSA P-256", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String())}},
		{name: "valid Ed25519", key: edKey, tmpl: x509.CertificateRequest{URIs: uri(ordersID.String())}},
		{name: "subject is ignored", tmpl: x509.CertificateRequest{Subject: pkix.Name{CommonName: "anything"}, URIs: uri(ordersID.String())}},
		{name: "leaf basicConstraints allowed", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String()), ExtraExtensions: []pkix.Extension{{Id: oidBasicConstraints, Value: bcLeaf}}}},
		{name: "wrong identity", tmpl: x509.CertificateRequest{URIs: uri("spiffe://cluster.local/ns/shipping/sa/payments")}, wantErr: "authenticated as"},
		{name: "other trust domain", tmpl: x509.CertificateRequest{URIs: uri("spiffe://evil.example/ns/shipping/sa/orders-api")}, wantErr: "authenticated as"},
		{name: "two URI SANs", tmpl: x509.CertificateRequest{URIs: append(uri(ordersID.String()), uri("spiffe://cluster.local/ns/x/sa/y")...)}, wantErr: "exactly one"},
		{name: "no URI SAN", tmpl: x509.CertificateRequest{}, wantErr: "no URI SAN"},
		{name: "non-SPIFFE URI", tmpl: x509.CertificateRequest{URIs: uri("https://cluster.local/ns/shipping/sa/orders-api")}, wantErr: "not a SPIFFE ID"},
		{name: "DNS SAN", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String()), DNSNames: []string{"orders.example"}}, wantErr: "DNS"},
		{name: "IP SAN", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String()), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}, wantErr: "DNS, e-mail or IP"},
		{name: "asks for CA", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String()), ExtraExtensions: []pkix.Extension{{Id: oidBasicConstraints, Critical: true, Value: bcCA}}}, wantErr: "CA rights"},
		{name: "asks for cert signing", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String()), ExtraExtensions: []pkix.Extension{{Id: oidKeyUsage, Critical: true, Value: kuCertSign}}}, wantErr: "signing key usage"},
		{name: "weak curve P-224", key: p224, tmpl: x509.CertificateRequest{URIs: uri(ordersID.String())}, wantErr: "weak ECDSA curve"},
		{name: "weak RSA 1024", key: rsa1024, tmpl: x509.CertificateRequest{URIs: uri(ordersID.String())}, wantErr: "weak RSA key"},
		{name: "bad signature", tmpl: x509.CertificateRequest{URIs: uri(ordersID.String())}, corrupt: true, wantErr: "signature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := tc.key
			if key == nil {
				key = ecKey(t)
			}
			der, err := x509.CreateCertificateRequest(rand.Reader, &tc.tmpl, key)
			if err != nil {
				t.Fatal(err)
			}
			if tc.corrupt {
				der[len(der)-3] ^= 0xff // inside the signature
			}
			_, err = ValidateCSR(der, ordersID)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("rejected a valid CSR: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.wantErr)
			}
			if !errors.Is(err, ErrInvalidCSR) {
				t.Fatalf("err = %v does not wrap ErrInvalidCSR", err)
			}
		})
	}
}
