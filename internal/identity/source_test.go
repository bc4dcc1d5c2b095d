package identity_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	identityv1 "github.com/trellis-mesh/trellis/api/identity/v1"
	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/jointoken"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger { return slog.New(slog.NewTextHandler(testWriter{t}, nil)) }

// controlPlane is a real identity service on loopback.
type controlPlane struct {
	ca     *ca.CA
	tokens *jointoken.Store
	addr   string
	stop   func()
}

func startControlPlane(t *testing.T) *controlPlane {
	t.Helper()
	return startControlPlaneWith(t, false)
}

func startControlPlaneWith(t *testing.T, requireCredential bool) *controlPlane {
	t.Helper()
	dir := t.TempDir()
	authority, err := ca.Init(ca.Config{StateDir: dir, Log: testLogger(t)}, ca.InitOptions{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	tokens := jointoken.NewStore(dir, nil)
	svc := identityservice.New(identityservice.Config{
		CA:                authority,
		Authenticators:    []identityservice.Authenticator{identityservice.JoinTokens{Store: tokens, TrustDomain: td}},
		Log:               testLogger(t),
		RequireCredential: requireCredential,
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(svc.ServerCredentials()))
	svc.Register(g)
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(lis) }()
	cp := &controlPlane{ca: authority, tokens: tokens, addr: lis.Addr().String()}
	cp.stop = func() { g.Stop(); <-done }
	t.Cleanup(cp.stop)
	return cp
}

func (cp *controlPlane) source(t *testing.T, ns, sa string, token string) *identity.Source {
	t.Helper()
	id, err := meshid.Workload(td, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	src, err := identity.NewSource(identity.Config{
		Log:        testLogger(t),
		Addr:       cp.addr,
		ID:         id,
		ServerID:   meshid.ControlPlane(td),
		Bundle:     cp.ca.Bundle(),
		Credential: &identityv1.Credential{Type: identityservice.JoinTokenType, Value: token},
	})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func (cp *controlPlane) token(t *testing.T, ns, sa string) string {
	t.Helper()
	tok, _, err := cp.tokens.Create(ns, sa, time.Hour, 1)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestBootstrapWithTokenThenRenewWithSVID(t *testing.T) {
	cp := startControlPlane(t)
	src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-src.Ready():
	default:
		t.Fatal("Ready not closed after the first SVID")
	}
	first := src.Current()
	if first.ID.String() != "spiffe://cluster.local/ns/shipping/sa/orders-api" {
		t.Fatalf("ID = %s", first.ID)
	}
	if s := src.SecondsToExpiry(); s < 23*3600 || s > 24*3600 {
		t.Fatalf("SecondsToExpiry = %v, want about a day", s)
	}
	// The token was single-use: this renewal can only succeed through the
	// SVID presented as client certificate.
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatalf("renewal with the current SVID: %v", err)
	}
	second := src.Current()
	if second.Chain[0].SerialNumber.Cmp(first.Chain[0].SerialNumber) == 0 {
		t.Fatal("renewal returned the same certificate")
	}
	if second.Key == first.Key {
		t.Fatal("renewal reused the private key")
	}
}

func TestServiceRefusals(t *testing.T) {
	cp := startControlPlane(t)
	for _, tc := range []struct {
		name     string
		src      func() *identity.Source
		wantCode codes.Code
		wantText string
	}{
		{
			name: "token for another identity",
			src: func() *identity.Source {
				return cp.source(t, "shipping", "payments", cp.token(t, "shipping", "orders-api"))
			},
			wantCode: codes.InvalidArgument, wantText: "authenticated as",
		},
		{
			name: "forged token",
			src: func() *identity.Source {
				return cp.source(t, "shipping", "orders-api", "trellis-jt1.001122334455.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
			},
			wantCode: codes.Unauthenticated,
		},
		{
			name: "unknown credential type",
			src: func() *identity.Source {
				return withCredential(t, cp, &identityv1.Credential{Type: "password", Value: "x"})
			},
			wantCode: codes.InvalidArgument, wantText: "join-token",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.src().Fetch(ctx(t))
			if status.Code(errors.Unwrap(err)) != tc.wantCode && status.Code(err) != tc.wantCode {
				t.Fatalf("err = %v, want code %v", err, tc.wantCode)
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.wantText)
			}
		})
	}
}

// staticAuth authenticates every credential as one fixed identity; it
// stands in for an authenticator that a compromised or misconfigured
// credential source could make return anything.
type staticAuth struct{ id spiffeid.ID }

func (staticAuth) Type() string { return "static" }
func (a staticAuth) Authenticate(context.Context, string) (spiffeid.ID, error) {
	return a.id, nil
}

// TestControlPlaneIdentityIsNeverIssued: no credential, whatever it says,
// buys the identity workloads trust the control plane by.
func TestControlPlaneIdentityIsNeverIssued(t *testing.T) {
	dir := t.TempDir()
	authority, err := ca.Init(ca.Config{StateDir: dir}, ca.InitOptions{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	cpID := meshid.ControlPlane(td)
	svc := identityservice.New(identityservice.Config{CA: authority, Authenticators: []identityservice.Authenticator{staticAuth{cpID}}})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(svc.ServerCredentials()))
	svc.Register(g)
	go func() { _ = g.Serve(lis) }()
	defer g.Stop()
	src, err := identity.NewSource(identity.Config{
		Addr: lis.Addr().String(), ID: cpID, ServerID: cpID, Bundle: authority.Bundle(),
		Credential: &identityv1.Credential{Type: "static", Value: "x"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); status.Code(errors.Unwrap(err)) != codes.PermissionDenied && !strings.Contains(fmt.Sprint(err), "PermissionDenied") {
		t.Fatalf("asking for the control plane's identity: %v, want PermissionDenied", err)
	}
	if _, _, err := jointoken.NewStore(dir, nil).Create(meshid.RootNamespace, meshid.ControlPlaneServiceAccount, time.Hour, 1); err == nil {
		t.Fatal("a join token for the control plane's identity was created")
	}
}

// TestBadRequestDoesNotSpendTheToken: a request refused for its TTL or CSR
// leaves the single-use token for the corrected retry.
func TestBadRequestDoesNotSpendTheToken(t *testing.T) {
	cp := startControlPlane(t)
	tok := cp.token(t, "shipping", "orders-api")
	greedy, err := identity.NewSource(identity.Config{
		Addr: cp.addr, ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID: meshid.ControlPlane(td), Bundle: cp.ca.Bundle(), TTL: 30 * 24 * time.Hour,
		Credential: &identityv1.Credential{Type: identityservice.JoinTokenType, Value: tok},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := greedy.Fetch(ctx(t)); err == nil || !strings.Contains(err.Error(), "maximum") {
		t.Fatalf("a 30-day certificate: %v, want a refusal naming the maximum", err)
	}
	if err := cp.source(t, "shipping", "orders-api", tok).Fetch(ctx(t)); err != nil {
		t.Fatalf("the corrected request with the same token: %v", err)
	}
}

func withCredential(t *testing.T, cp *controlPlane, cred *identityv1.Credential) *identity.Source {
	src, err := identity.NewSource(identity.Config{
		Addr: cp.addr, ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID: meshid.ControlPlane(td), Bundle: cp.ca.Bundle(), Credential: cred,
	})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func TestClientRefusesAServerWithTheWrongIdentity(t *testing.T) {
	cp := startControlPlane(t)
	src, err := identity.NewSource(identity.Config{
		Addr:       cp.addr,
		ID:         spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID:   spiffeid.RequireFromString("spiffe://cluster.local/ns/trellis-system/sa/someone-else"),
		Bundle:     cp.ca.Bundle(),
		Credential: &identityv1.Credential{Type: identityservice.JoinTokenType, Value: cp.token(t, "shipping", "orders-api")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); err == nil {
		t.Fatal("fetched from a server with an unexpected SPIFFE ID")
	}
	// The token must not have been spent on a server we did not trust.
	if live, _ := cp.tokens.List(); len(live) != 1 {
		t.Fatalf("%d live tokens, want the unspent one", len(live))
	}
}

func TestClientRefusesAServerFromAnotherCA(t *testing.T) {
	cp := startControlPlane(t)
	other := startControlPlane(t)
	src, err := identity.NewSource(identity.Config{
		Addr: cp.addr, ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID: meshid.ControlPlane(td), Bundle: other.ca.Bundle(),
		Credential: &identityv1.Credential{Type: identityservice.JoinTokenType, Value: cp.token(t, "shipping", "orders-api")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); err == nil {
		t.Fatal("fetched from a server that does not chain to our bundle")
	}
}

func TestOutageKeepsCurrentCertificate(t *testing.T) {
	cp := startControlPlane(t)
	src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	held := src.Current()
	cp.stop()
	c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := src.Fetch(c); err == nil {
		t.Fatal("fetch succeeded with the control plane down")
	}
	if src.Current() != held {
		t.Fatal("a failed renewal replaced the current certificate")
	}
	if _, err := src.GetCertificate(nil); err != nil {
		t.Fatalf("no certificate served during the outage: %v", err)
	}
}

func TestRunObtainsCertificate(t *testing.T) {
	cp := startControlPlane(t)
	src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	c, cancel := context.WithCancel(ctx(t))
	done := make(chan error, 1)
	go func() { done <- src.Run(c) }()
	select {
	case <-src.Ready():
	case <-c.Done():
		t.Fatal("Run did not obtain a certificate in time")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestRotationKeepsOpenConnections rotates a server's SVID while a mutual-TLS
// connection is open: the open connection keeps working and new handshakes
// get the new certificate.
func TestRotationKeepsOpenConnections(t *testing.T) {
	cp := startControlPlane(t)
	server := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	client := cp.source(t, "web", "frontend", cp.token(t, "web", "frontend"))
	for _, s := range []*identity.Source{server, client} {
		if err := s.Fetch(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	serverCfg := tlsconfig.MTLSServerConfig(server, server, tlsconfig.AuthorizeID(client.Current().ID))
	lis, err := tls.Listen("tcp", "127.0.0.1:0", serverCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); _, _ = io.Copy(conn, conn) }() // echo
		}
	}()
	dial := func() (*tls.Conn, *x509.Certificate) {
		cfg := tlsconfig.MTLSClientConfig(client, client, tlsconfig.AuthorizeID(server.Current().ID))
		conn, err := tls.Dial("tcp", lis.Addr().String(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		return conn, conn.ConnectionState().PeerCertificates[0]
	}
	echo := func(conn *tls.Conn, msg string) {
		t.Helper()
		if _, err := io.WriteString(conn, msg+"\n"); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil || got != msg+"\n" {
			t.Fatalf("echo %q: got %q, %v", msg, got, err)
		}
	}
	old, oldCert := dial()
	defer old.Close()
	echo(old, "before rotation")

	if err := server.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	echo(old, "after rotation")
	fresh, newCert := dial()
	defer fresh.Close()
	if newCert.SerialNumber.Cmp(oldCert.SerialNumber) == 0 {
		t.Fatal("a new handshake still got the old certificate")
	}
	echo(fresh, "new connection")
}

func TestRenewAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(100 * time.Hour)
	for _, tc := range []struct {
		jitter float64
		want   time.Duration
	}{
		{0, 70 * time.Hour},
		{1, 75 * time.Hour},
		{-1, 65 * time.Hour},
		{5, 75 * time.Hour}, // clamped
		{-5, 65 * time.Hour},
	} {
		if got := identity.RenewAt(nb, na, tc.jitter).Sub(nb); got != tc.want {
			t.Errorf("RenewAt(jitter %v) = +%v, want +%v", tc.jitter, got, tc.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		attempt int
		jitter  float64
		want    time.Duration
	}{
		{0, 0, time.Second},
		{1, 0, 2 * time.Second},
		{5, 0, 32 * time.Second},
		{6, 0, time.Minute},
		{60, 0, time.Minute},
		{0, 0.5, 1100 * time.Millisecond},
		{100, 0.999, time.Minute + time.Duration(float64(time.Minute)*0.2*0.999)},
	} {
		if got := identity.Backoff(tc.attempt, tc.jitter); got != tc.want {
			t.Errorf("Backoff(%d, %v) = %v, want %v", tc.attempt, tc.jitter, got, tc.want)
		}
	}
}

func TestSVIDFilesRoundTrip(t *testing.T) {
	cp := startControlPlane(t)
	src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := src.Current().WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	loaded, err := identity.LoadFiles(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if loaded.ID != src.Current().ID || !loaded.Chain[0].Equal(src.Current().Chain[0]) {
		t.Fatal("files did not round-trip")
	}
	other := startControlPlane(t)
	otherSrc := other.source(t, "shipping", "orders-api", other.token(t, "shipping", "orders-api"))
	if err := otherSrc.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := identity.NewSVID(loaded.Chain, otherSrc.Current().Key, loaded.Bundle, time.Now()); err == nil {
		t.Fatal("accepted a key that does not match the certificate")
	}
	if _, err := identity.NewSVID(loaded.Chain, loaded.Key, otherSrc.Current().Bundle, time.Now()); err == nil {
		t.Fatal("accepted a chain that does not verify against the bundle")
	}
}

// TestCredentialFileIsReadAtEachUse: a token file (Kubernetes refreshes
// its projected token in place) is read when a credential is needed, not
// once at start.
func TestCredentialFileIsReadAtEachUse(t *testing.T) {
	cp := startControlPlane(t)
	file := filepath.Join(t.TempDir(), "token")
	src, err := identity.NewSource(identity.Config{
		Addr: cp.addr, ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID: meshid.ControlPlane(td), Bundle: cp.ca.Bundle(),
		CredentialFile: file, CredentialType: identityservice.JoinTokenType,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("without the file: %v, want an error naming it", err)
	}
	if err := os.WriteFile(file, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Fatalf("with an empty file: %v", err)
	}
	if err := os.WriteFile(file, []byte(cp.token(t, "shipping", "orders-api")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatalf("once the file holds a token: %v", err)
	}
}

// TestRenewalNeedsACredentialWhenRequired: a control plane that requires a
// credential on every request (Kubernetes: the pod's token) refuses a
// renewal by certificate alone — a deleted pod's certificate cannot renew
// itself — and accepts one that carries a credential.
func TestRenewalNeedsACredentialWhenRequired(t *testing.T) {
	cp := startControlPlaneWith(t, true)
	src := cp.source(t, "shipping", "orders-api", cp.token(t, "shipping", "orders-api"))
	if err := src.Fetch(ctx(t)); err != nil {
		t.Fatal(err)
	}
	err := src.Fetch(ctx(t)) // the join token is spent: certificate only
	if err == nil || !strings.Contains(err.Error(), "only against a credential") {
		t.Fatalf("renewal by certificate alone: %v, want a refusal", err)
	}
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(cp.token(t, "shipping", "orders-api")), 0o600); err != nil {
		t.Fatal(err)
	}
	renewing, err := identity.NewSource(identity.Config{
		Addr: cp.addr, ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api"),
		ServerID: meshid.ControlPlane(td), Bundle: cp.ca.Bundle(),
		CredentialFile: file, CredentialType: identityservice.JoinTokenType,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := renewing.Fetch(ctx(t)); err != nil {
		t.Fatalf("a request with a credential: %v", err)
	}
}
