package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/tlsfiles"
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
	host   string
	tls    *config.OriginateTLS // nil: plain
	dialer *net.Dialer
	// transport carries HTTP requests, its connections pooled per
	// endpoint; with TLS its requests are https.
	transport *http.Transport
	// material is the TLS configuration, from the files as they are.
	material *tlsfiles.Reloader[*tls.Config]
}

func newOriginator(host string, t *config.OriginateTLS, dialer *net.Dialer, log *slog.Logger) *originator {
	if t != nil && t.Mode == "DISABLE" {
		t = nil
	}
	o := &originator{host: host, tls: t, dialer: dialer}
	o.transport = &http.Transport{
		DialContext:         dialer.DialContext,
		DialTLSContext:      func(ctx context.Context, _, addr string) (net.Conn, error) { return o.dial(ctx, addr) },
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     idleTimeout,
		ForceAttemptHTTP2:   false,
		Proxy:               nil,
	}
	if t != nil {
		client := tlsfiles.Client{Mutual: t.Mode == "MUTUAL", Certificate: t.ClientCertificate, PrivateKey: t.PrivateKey,
			CACertificates: t.CACertificates, SNI: t.SNI, SubjectAltNames: t.SubjectAltNames, InsecureSkipVerify: t.InsecureSkipVerify}
		o.material = &tlsfiles.Reloader[*tls.Config]{
			Files: client.Files(),
			Load:  func(now time.Time) (*tls.Config, error) { return client.Config(host, now) },
			Still: func(cfg *tls.Config, now time.Time) error {
				if len(cfg.Certificates) == 0 {
					return nil
				}
				return tlsfiles.ValidAt(&cfg.Certificates[0], t.ClientCertificate, now)
			},
			Log: log.With("host", host), What: "the TLS of an external destination:",
		}
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
	cfg, err := o.material.Get(time.Now())
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

// retire closes the idle connections of an originator a new routing
// table no longer uses, now and once the requests in flight have had the
// drain time to finish (their connections return to the pool idle).
func (o *originator) retire() {
	o.transport.CloseIdleConnections()
	time.AfterFunc(DrainTimeout, o.transport.CloseIdleConnections)
}
