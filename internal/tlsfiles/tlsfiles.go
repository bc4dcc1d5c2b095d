// Package tlsfiles turns TLS settings that name PEM files — the TLS a
// sidecar originates to a host outside the mesh (a DestinationRule's), and
// an ingress gateway's certificate — into Go TLS configurations, with one
// explanation per problem (a missing file, a key that is not the
// certificate's, a client certificate out of its validity, a CA file
// without certificates) for every place that reports it: the proxy's 502s
// and log, and the control plane's status. A Reloader reads the files
// again when they change.
package tlsfiles

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// Client is the TLS a sidecar originates to a host outside the mesh.
type Client struct {
	Mutual                                  bool // present a client certificate (DestinationRule mode MUTUAL)
	Certificate, PrivateKey, CACertificates string
	SNI                                     string
	SubjectAltNames                         []string
	InsecureSkipVerify                      bool
}

// Files are the files the settings name.
func (c Client) Files() []string {
	var out []string
	for _, f := range []string{c.Certificate, c.PrivateKey, c.CACertificates} {
		if f != "" {
			out = append(out, f)
		}
	}
	return out
}

// Config builds the client configuration for host from the files as they
// are: the server verified against CACertificates (the system's roots
// without) and SubjectAltNames, the client certificate presented whatever
// CAs the server names — a server that names none for it fails the
// handshake with the CAs it does accept, rather than the certificate being
// left out silently.
func (c Client) Config(host string, now time.Time) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.SNI, InsecureSkipVerify: c.InsecureSkipVerify}
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	if c.CACertificates != "" {
		pem, err := os.ReadFile(c.CACertificates)
		if err != nil {
			return nil, fmt.Errorf("caCertificates: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("caCertificates %s: no PEM certificate in it", c.CACertificates)
		}
		cfg.RootCAs = pool
	}
	if c.Mutual {
		pair, err := keyPair("clientCertificate", c.Certificate, "privateKey", c.PrivateKey)
		if err != nil {
			return nil, err
		}
		if err := ValidAt(pair, c.Certificate, now); err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{*pair}
		cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if err := cri.SupportsCertificate(pair); err != nil {
				return nil, fmt.Errorf("the server does not accept the client certificate %s (%v): it accepts certificates from %s",
					c.Certificate, err, acceptableCAs(cri.AcceptableCAs))
			}
			return pair, nil
		}
	}
	if sans := c.SubjectAltNames; len(sans) > 0 && !c.InsecureSkipVerify {
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

// ServerCertificate loads a server's certificate and key.
func ServerCertificate(cert, key string) (*tls.Certificate, error) {
	return keyPair("certificate", cert, "privateKey", key)
}

func keyPair(certField, cert, keyField, key string) (*tls.Certificate, error) {
	for _, f := range [][2]string{{certField, cert}, {keyField, key}} {
		if _, err := os.Stat(f[1]); err != nil {
			return nil, fmt.Errorf("%s: %w", f[0], err)
		}
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, fmt.Errorf("%s %s and %s %s: %w", certField, cert, keyField, key, err)
	}
	return &pair, nil
}

// ValidAt refuses a certificate outside its validity: a peer would refuse
// it, less clearly.
func ValidAt(pair *tls.Certificate, file string, now time.Time) error {
	leaf := pair.Leaf
	switch {
	case leaf == nil:
		return nil
	case now.After(leaf.NotAfter):
		return fmt.Errorf("the certificate %s expired at %s", file, leaf.NotAfter.Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("the certificate %s is not valid before %s", file, leaf.NotBefore.Format(time.RFC3339))
	}
	return nil
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

// Recheck is how often a Reloader looks at its files for changes.
const Recheck = time.Second

// Reloader holds what Load makes of Files, made again when they change
// (looked at at most every Recheck). When files that worked change into
// files that do not — caught mid-rotation, a certificate written before
// its key — the previous value stays in use, the change is tried again,
// and a warning goes out at most once a minute.
type Reloader[T any] struct {
	Files []string
	Load  func(now time.Time) (T, error)
	// Still checks a kept value at each use (a certificate that has since
	// expired); nil for none.
	Still func(v T, now time.Time) error
	Log   *slog.Logger
	What  string // for the warning

	mu      sync.Mutex
	checked time.Time
	stamp   string
	value   T
	have    bool
	err     error
	warned  time.Time
}

// Get returns the value for the files as they are now.
func (r *Reloader[T]) Get(now time.Time) (T, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	loaded := r.have || r.err != nil
	if loaded && now.Sub(r.checked) < Recheck {
		return r.current(now)
	}
	r.checked = now
	if stamp := stamp(r.Files); loaded && stamp == r.stamp {
		return r.current(now)
	} else {
		r.stamp = stamp
	}
	v, err := r.Load(now)
	if err != nil && r.have && r.still(r.value, now) == nil {
		if now.Sub(r.warned) >= time.Minute {
			r.warned = now
			r.Log.Warn(r.What+" files changed and cannot be used; keeping the previous ones", "err", err)
		}
		r.stamp = "" // try again
		return r.value, nil
	}
	if err != nil {
		var zero T
		r.value, r.have, r.err = zero, false, err
		return zero, err
	}
	r.value, r.have, r.err = v, true, nil
	return v, nil
}

func (r *Reloader[T]) current(now time.Time) (T, error) {
	if r.err != nil {
		var zero T
		return zero, r.err
	}
	if err := r.still(r.value, now); err != nil {
		var zero T
		return zero, err
	}
	return r.value, nil
}

func (r *Reloader[T]) still(v T, now time.Time) error {
	if r.Still == nil {
		return nil
	}
	return r.Still(v, now)
}

// stamp identifies the files' contents by size and modification time.
func stamp(files []string) string {
	var b strings.Builder
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s:%d:%d;", f, fi.Size(), fi.ModTime().UnixNano())
		} else {
			fmt.Fprintf(&b, "%s:missing;", f)
		}
	}
	return b.String()
}
