package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trellis-mesh/trellis/internal/identity"
)

// ALPN protocols mark connections between Trellis proxies and say what they
// carry. A TLS ClientHello without one of them is an application's own TLS,
// which the inbound side passes through untouched where the mode allows.
const (
	ALPNHTTP2 = "trellis-h2"    // HTTP requests multiplexed over one long-lived connection
	ALPNHTTP1 = "trellis-http1" // HTTP/1.1 with upgrades (WebSocket), one connection per stream
	ALPNTCP   = "trellis-tcp"   // one opaque TCP stream
)

var meshALPN = []string{ALPNHTTP2, ALPNHTTP1, ALPNTCP}

// isMeshALPN reports whether a ClientHello's ALPN list marks a connection
// from another Trellis proxy.
func isMeshALPN(protos []string) bool {
	for _, p := range protos {
		for _, m := range meshALPN {
			if p == m {
				return true
			}
		}
	}
	return false
}

// peerVerifier checks a peer's certificate chain against the trust bundle of
// the proxy's current SVID, so a bundle update (root rotation) takes effect
// on the next handshake.
type peerVerifier struct {
	holder *identity.Holder
	now    func() time.Time
}

func (v peerVerifier) verify(raw [][]byte) (spiffeid.ID, error) {
	svid := v.holder.Current()
	if svid == nil {
		return spiffeid.ID{}, identity.ErrNoSVID
	}
	if len(raw) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	bundle, err := v.holder.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		return spiffeid.ID{}, err
	}
	id, _, err := x509svid.ParseAndVerify(raw, bundle, x509svid.WithTime(v.now()))
	return id, err
}

// serverTLS terminates mesh mTLS: our SVID, a required client SVID that
// chains to our bundle, TLS 1.3 only, and one of the mesh ALPN protocols.
func (p *Proxy) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: p.opts.Identity.GetCertificate,
		ClientAuth:     tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := p.verifier.verify(raw)
			return err
		},
		NextProtos: meshALPN,
		// Every mesh connection proves its identity afresh, against the
		// bundle in force now: resumption would skip that.
		SessionTicketsDisabled: true,
	}
}

// dialMesh opens an mTLS connection to a peer proxy at addr that must
// present want (secure naming), speaking alpn.
func (p *Proxy) dialMesh(ctx context.Context, addr, alpn string, want spiffeid.ID) (*tls.Conn, error) {
	cfg := &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: p.opts.Identity.GetClientCertificate,
		// The chain and the SPIFFE ID are checked below, by identity, not by
		// host name: that is what secure naming means.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := p.verifier.verify(raw)
			if err != nil {
				return err
			}
			if id != want {
				return fmt.Errorf("%w: %s presented %s, want %s", errWrongIdentity, addr, id, want)
			}
			return nil
		},
		NextProtos: []string{alpn},
	}
	raw, err := p.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	conn := tls.Client(raw, cfg)
	hsCtx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	if err := conn.HandshakeContext(hsCtx); err != nil {
		raw.Close()
		return nil, err
	}
	if conn.ConnectionState().NegotiatedProtocol != alpn {
		conn.Close()
		return nil, fmt.Errorf("peer at %s did not accept %s: it is not a Trellis proxy or is too old", addr, alpn)
	}
	return conn, nil
}

var errWrongIdentity = errors.New("secure naming: wrong server identity")

// peerPrincipal returns the SPIFFE ID of a verified TLS peer.
func peerPrincipal(state tls.ConnectionState) (spiffeid.ID, error) {
	if len(state.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("no peer certificate")
	}
	return x509svid.IDFromCert(state.PeerCertificates[0])
}
