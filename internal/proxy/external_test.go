package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// testPKI is an external system's own CA (nothing to do with the mesh's),
// with which it signs its server certificate and its clients'.
type testPKI struct {
	t    *testing.T
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestPKI(t *testing.T, name string) *testPKI {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := &testPKI{t: t, dir: t.TempDir(), cert: cert, key: key}
	p.write("ca.pem", "CERTIFICATE", der)
	return p
}

func (p *testPKI) write(name, kind string, der []byte) string {
	p.t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
	return path
}

// issue writes a certificate and key for cn (a server for dns, else a
// client) valid from notBefore to notAfter, and returns their files.
func (p *testPKI) issue(name, cn string, dns []string, notBefore, notAfter time.Time) (certFile, keyFile string) {
	p.t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	usage := x509.ExtKeyUsageClientAuth
	if len(dns) > 0 {
		usage = x509.ExtKeyUsageServerAuth
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn}, DNSNames: dns,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}, NotBefore: notBefore, NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	return p.write(name+".pem", "CERTIFICATE", der), p.write(name+".key", "EC PRIVATE KEY", kder)
}

// TestEgressTLSOrigination: the application calls http://host:80; its
// proxy originates mutual TLS to the external server with the client
// certificate in files, verifying the server against the CA file; every
// problem is a 502 that says what is wrong; a renewed file is used without
// restart.
func TestEgressTLSOrigination(t *testing.T) {
	const host = "ext.example.test"
	pki := newTestPKI(t, "partner CA")
	now := time.Now()
	srvCert, srvKey := pki.issue("server", host, []string{host}, now.Add(-time.Hour), now.Add(time.Hour))
	clientCert, clientKey := pki.issue("client", "shop", nil, now.Add(-time.Hour), now.Add(time.Hour))
	renewedCert, renewedKey := pki.issue("renewed", "shop-renewed", nil, now.Add(-time.Hour), now.Add(time.Hour))
	expiredCert, expiredKey := pki.issue("expired", "shop", nil, now.Add(-2*time.Hour), now.Add(-time.Hour))
	other := newTestPKI(t, "another CA")
	rogueCert, rogueKey := other.issue("rogue", "shop", nil, now.Add(-time.Hour), now.Add(time.Hour))

	pair, err := tls.LoadX509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(pki.cert)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello "+r.TLS.PeerCertificates[0].Subject.CommonName+" at "+r.Host+r.URL.Path)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots}
	srv.StartTLS()
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())

	iss := newIssuer(t)
	proxyAddr := freeAddr(t)
	cfg := checkoutConfig()
	cfg.HTTPProxy = proxyAddr
	checkout := startProxy(t, cfg, iss.holderFor(checkoutID))
	apply := func(version string, tlsCfg *config.OriginateTLS) {
		t.Helper()
		mustApply(t, checkout, Update{Version: version, Destinations: []config.Outbound{{
			Service: host, Port: 80, Protocol: config.ProtocolHTTP, External: true, TLS: tlsCfg,
			Endpoints: []config.Endpoint{{Address: "127.0.0.1:" + port}},
		}}})
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyAddr})}}
	get := func() (int, string) { return getBody(t, client, "http://"+host+"/orders") }

	mutual := &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: clientCert, PrivateKey: clientKey, CACertificates: filepath.Join(pki.dir, "ca.pem")}
	apply("mutual", mutual)
	if code, body := get(); code != 200 || body != "hello shop at "+host+"/orders" {
		t.Fatalf("through the originated mTLS: %d %q", code, body)
	}

	for _, tc := range []struct {
		name string
		tls  *config.OriginateTLS
		want string
	}{
		{"no client certificate", &config.OriginateTLS{Mode: "SIMPLE", CACertificates: mutual.CACertificates}, "tls: "},
		{"client certificate from another CA", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: rogueCert, PrivateKey: rogueKey, CACertificates: mutual.CACertificates}, "accepts certificates from CN=partner CA"},
		{"server from another CA", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: clientCert, PrivateKey: clientKey, CACertificates: filepath.Join(other.dir, "ca.pem")}, "certificate signed by unknown authority"},
		{"missing file", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: filepath.Join(pki.dir, "nope.pem"), PrivateKey: clientKey}, "clientCertificate"},
		{"key of another certificate", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: clientCert, PrivateKey: renewedKey, CACertificates: mutual.CACertificates}, "private key does not match"},
		{"expired client certificate", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: expiredCert, PrivateKey: expiredKey, CACertificates: mutual.CACertificates}, "expired at"},
		{"wrong subjectAltName", &config.OriginateTLS{Mode: "MUTUAL", ClientCertificate: clientCert, PrivateKey: clientKey, CACertificates: mutual.CACertificates, SubjectAltNames: []string{"other.example.test"}}, "none of the subjectAltNames"},
	} {
		apply(tc.name, tc.tls)
		code, body := get()
		if code != http.StatusBadGateway || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %q, want 502 saying %q", tc.name, code, body, tc.want)
		}
	}

	// The files change under the same configuration: the next connection
	// presents the renewed certificate.
	apply("mutual again", mutual)
	if code, body := get(); code != 200 || !strings.HasPrefix(body, "hello shop at") {
		t.Fatalf("back to mutual: %d %q", code, body)
	}
	for _, f := range [][2]string{{renewedCert, clientCert}, {renewedKey, clientKey}} {
		data, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	checkout.table.Load().externals[originatorKey(host, mutual)].transport.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := get()
		if strings.HasPrefix(body, "hello shop-renewed") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the renewed certificate was not used: %q", body)
		}
		checkout.table.Load().externals[originatorKey(host, mutual)].transport.CloseIdleConnections()
		time.Sleep(100 * time.Millisecond)
	}
}
