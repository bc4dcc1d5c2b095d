package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// originator reaches the endpoints of a destination outside the mesh (a
// ServiceEntry host): plain, or with the TLS a DestinationRule asks the
// proxy to originate — verifying the server against caCertificates (the
// system's roots without) and subjectAltNames, and, for MUTUAL, presenting
// the client certificate. Its files are read when first needed and again
// whenever they change, so a renewed certificate needs no restart. A
// problem with them fails the connection with an error that says which
// file and why; nothing ever falls back to plaintext.
type originator struct {
	log    *slog.Logger
	host   string
	tls    *config.OriginateTLS // nil: plain
	dialer *net.Dialer
	// transport carries HTTP requests, its connections pooled per
	// endpoint; with TLS its requests are https.
	transport *http.Transport

	mu       sync.Mutex
	checked  time.Time // when the files were last looked at
	stamp    string    // their sizes and modification times then
	material *tls.Config
	err      error
	warned   time.Time // when the last "keeping the previous" warning went out
}

// tlsRecheck is how often an originator looks at its files for changes.
const tlsRecheck = time.Second

func newOriginator(host string, t *config.OriginateTLS, dialer *net.Dialer, log *slog.Logger) *originator {
	if t != nil && t.Mode == "DISABLE" {
		t = nil
	}
	o := &originator{host: host, tls: t, dialer: dialer, log: log}
	o.transport = &http.Transport{
		DialContext:         dialer.DialContext,
		DialTLSContext:      func(ctx context.Context, _, addr string) (net.Conn, error) { return o.dial(ctx, addr) },
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     idleTimeout,
		ForceAttemptHTTP2:   false,
		Proxy:               nil,
	}
	return o
}

// key identifies what an originator does, so a routing table can keep one
// across updates that do not change it.
func originatorKey(host string, t *config.OriginateTLS) string {
	if t == nil {
		return host
	}
	return fmt.Sprintf("%s|%s|%s|%s|%s|%s|%v|%v", host, t.Mode, t.ClientCertificate, t.PrivateKey, t.CACertificates, t.SNI, t.SubjectAltNames, t.InsecureSkipVerify)
}

// secured reports whether the proxy originates TLS (the metrics' tls).
func (o *originator) secured() bool { return o.tls != nil }

// scheme is the URL scheme of requests through transport.
func (o *originator) scheme() string {
	if o.secured() {
		return "https"
	}
	return "http"
}

// dial connects to an endpoint, with TLS when the destination asks for it.
func (o *originator) dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := o.dialer.DialContext(ctx, "tcp", addr)
	if err != nil || !o.secured() {
		return c, err
	}
	cfg, err := o.config()
	if err != nil {
		c.Close()
		return nil, err
	}
	tc := tls.Client(c, cfg)
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("TLS origination (%s) to %s (%s): %w", o.tls.Mode, o.host, addr, err)
	}
	return tc, nil
}

// config returns the TLS configuration, from the files as they are now.
func (o *originator) config() (*tls.Config, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	if now.Sub(o.checked) < tlsRecheck && (o.material != nil || o.err != nil) {
		return o.material, o.err
	}
	o.checked = now
	stamp := o.fileStamp()
	if stamp == o.stamp && (o.material != nil || o.err != nil) {
		// Same files; a client certificate may have expired since.
		if o.err == nil {
			if err := o.checkExpiry(o.material, now); err != nil {
				return nil, err
			}
		}
		return o.material, o.err
	}
	o.stamp = stamp
	material, err := o.load(now)
	if err != nil && o.material != nil && o.checkExpiry(o.material, now) == nil {
		// Files caught mid-rotation (a certificate written before its
		// key), or replaced by ones that do not work: the ones that did
		// stay in use, and the change is tried again.
		if now.Sub(o.warned) >= time.Minute {
			o.warned = now
			o.log.Warn("TLS files of an external destination changed and cannot be used; keeping the previous ones", "host", o.host, "err", err)
		}
		o.stamp = ""
		return o.material, nil
	}
	o.material, o.err = material, err
	return o.material, o.err
}

func (o *originator) fileStamp() string {
	var b strings.Builder
	for _, f := range []string{o.tls.ClientCertificate, o.tls.PrivateKey, o.tls.CACertificates} {
		if f == "" {
			continue
		}
		if fi, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s:%d:%d;", f, fi.Size(), fi.ModTime().UnixNano())
		} else {
			fmt.Fprintf(&b, "%s:missing;", f)
		}
	}
	return b.String()
}

func (o *originator) load(now time.Time) (*tls.Config, error) {
	t := o.tls
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.SNI, InsecureSkipVerify: t.InsecureSkipVerify}
	if cfg.ServerName == "" {
		cfg.ServerName = o.host
	}
	if t.CACertificates != "" {
		pem, err := os.ReadFile(t.CACertificates)
		if err != nil {
			return nil, fmt.Errorf("caCertificates: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("caCertificates %s: no PEM certificate in it", t.CACertificates)
		}
		cfg.RootCAs = pool
	}
	if t.Mode == "MUTUAL" {
		for _, f := range [][2]string{{"clientCertificate", t.ClientCertificate}, {"privateKey", t.PrivateKey}} {
			if _, err := os.Stat(f[1]); err != nil {
				return nil, fmt.Errorf("%s: %w", f[0], err)
			}
		}
		pair, err := tls.LoadX509KeyPair(t.ClientCertificate, t.PrivateKey)
		if err != nil {
			return nil, fmt.Errorf("clientCertificate %s and privateKey %s: %w", t.ClientCertificate, t.PrivateKey, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
		if err := o.checkExpiry(cfg, now); err != nil {
			return nil, err
		}
		// A certificate the server says it cannot accept (not issued by a
		// CA it names) fails the connection with that reason, rather than
		// being left out silently or refused less clearly by the server.
		cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if err := cri.SupportsCertificate(&pair); err != nil {
				return nil, fmt.Errorf("the server does not accept the client certificate %s (%v): it accepts certificates from %s",
					t.ClientCertificate, err, acceptableCAs(cri.AcceptableCAs))
			}
			return &pair, nil
		}
	}
	if sans := t.SubjectAltNames; len(sans) > 0 && !t.InsecureSkipVerify {
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			for _, want := range sans {
				// A DNS name or IP address as Go's hostname check
				// compares them (case, wildcards), or a URI exactly.
				if leaf.VerifyHostname(want) == nil || slices.ContainsFunc(leaf.URIs, func(u *url.URL) bool { return u.String() == want }) {
					return nil
				}
			}
			names := slices.Clone(leaf.DNSNames)
			for _, ip := range leaf.IPAddresses {
				names = append(names, ip.String())
			}
			for _, u := range leaf.URIs {
				names = append(names, u.String())
			}
			return fmt.Errorf("the server certificate names %v, none of the subjectAltNames %v", names, sans)
		}
	}
	return cfg, nil
}

// acceptableCAs names the CAs a server accepts client certificates from.
func acceptableCAs(raw [][]byte) string {
	var names []string
	for _, r := range raw {
		var name pkix.RDNSequence
		if _, err := asn1.Unmarshal(r, &name); err == nil {
			var n pkix.Name
			n.FillFromRDNSequence(&name)
			names = append(names, n.String())
		}
	}
	if len(names) == 0 {
		return "any CA it trusts"
	}
	return strings.Join(names, "; ")
}

// checkExpiry refuses a client certificate outside its validity: the
// server would refuse it, less clearly.
func (o *originator) checkExpiry(cfg *tls.Config, now time.Time) error {
	if len(cfg.Certificates) == 0 || cfg.Certificates[0].Leaf == nil {
		return nil
	}
	leaf := cfg.Certificates[0].Leaf
	switch {
	case now.After(leaf.NotAfter):
		return fmt.Errorf("the client certificate %s expired at %s", o.tls.ClientCertificate, leaf.NotAfter.Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("the client certificate %s is not valid before %s", o.tls.ClientCertificate, leaf.NotBefore.Format(time.RFC3339))
	}
	return nil
}

// retire closes the idle connections of an originator a new routing
// table no longer uses, now and once the requests in flight have had the
// drain time to finish (their connections return to the pool idle).
func (o *originator) retire() {
	o.transport.CloseIdleConnections()
	time.AfterFunc(DrainTimeout, o.transport.CloseIdleConnections)
}
