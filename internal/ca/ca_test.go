package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/certpem"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// fakeClock is a settable clock shared by a CA under test.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	ordersID = spiffeid.RequireFromString("spiffe://cluster.local/ns/shipping/sa/orders-api")
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, nil))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func newTestCA(t *testing.T) (*CA, *fakeClock) {
	t.Helper()
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	c, err := Init(Config{StateDir: t.TempDir(), Log: testLogger(t), Now: clock.Now}, InitOptions{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	return c, clock
}

func newCSR(t testing.TB, key crypto.Signer, uris ...string) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func ecKey(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func sign(t *testing.T, c *CA, id spiffeid.ID) []*x509.Certificate {
	t.Helper()
	chain, err := c.Sign(newCSR(t, ecKey(t), id.String()), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	return chain
}

// verifyAt checks chain with go-spiffe against the CA's bundle at now.
func verifyAt(chain []*x509.Certificate, bundle []*x509.Certificate, now time.Time) (spiffeid.ID, error) {
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, bundle), x509svid.WithTime(now))
	return id, err
}

func TestIssuedSVIDVerifiesWithGoSpiffe(t *testing.T) {
	c, clock := newTestCA(t)
	chain := sign(t, c, ordersID)
	id, err := verifyAt(chain, c.Bundle(), clock.Now())
	if err != nil {
		t.Fatalf("go-spiffe rejected our SVID: %v", err)
	}
	if id != ordersID {
		t.Fatalf("verified ID = %s, want %s", id, ordersID)
	}

	foreign, _ := newTestCA(t)
	if _, err := verifyAt(chain, foreign.Bundle(), clock.Now()); err == nil {
		t.Fatal("SVID verified against a foreign bundle")
	}
}

func TestSVIDFollowsSpec(t *testing.T) {
	c, clock := newTestCA(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		key       crypto.Signer
		wantUsage x509.KeyUsage
	}{
		{"ecdsa", ecKey(t), x509.KeyUsageDigitalSignature},
		{"rsa", rsaKey, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.Sign(newCSR(t, tc.key, ordersID.String()), ordersID, 0)
			if err != nil {
				t.Fatal(err)
			}
			leaf := chain[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != ordersID.String() {
				t.Errorf("URIs = %v, want exactly [%s]", leaf.URIs, ordersID)
			}
			if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
				t.Errorf("unexpected SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
			}
			if leaf.IsCA || !leaf.BasicConstraintsValid {
				t.Errorf("IsCA=%v BasicConstraintsValid=%v, want a leaf with basicConstraints", leaf.IsCA, leaf.BasicConstraintsValid)
			}
			if leaf.KeyUsage != tc.wantUsage {
				t.Errorf("KeyUsage = %v, want %v", leaf.KeyUsage, tc.wantUsage)
			}
			wantEKU := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
			if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != wantEKU[0] || leaf.ExtKeyUsage[1] != wantEKU[1] {
				t.Errorf("ExtKeyUsage = %v, want %v", leaf.ExtKeyUsage, wantEKU)
			}
			if got := leaf.NotAfter.Sub(clock.Now()); got != DefaultWorkloadTTL {
				t.Errorf("lifetime = %v, want default %v", got, DefaultWorkloadTTL)
			}
			if len(chain) != 2 || !chain[1].IsCA {
				t.Errorf("chain = %d certificates, want leaf + intermediate", len(chain))
			}
		})
	}
}

func TestSignRejectsOtherTrustDomain(t *testing.T) {
	c, _ := newTestCA(t)
	other := spiffeid.RequireFromString("spiffe://evil.example/ns/shipping/sa/orders-api")
	if _, err := c.Sign(newCSR(t, ecKey(t), other.String()), other, 0); err == nil {
		t.Fatal("signed an identity outside the CA's trust domain")
	}
}

func TestSignTTL(t *testing.T) {
	c, clock := newTestCA(t)
	chain, err := c.Sign(newCSR(t, ecKey(t), ordersID.String()), ordersID, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if got := chain[0].NotAfter.Sub(clock.Now()); got != 10*time.Minute {
		t.Fatalf("lifetime = %v, want 10m", got)
	}
	if _, err := c.Sign(newCSR(t, ecKey(t), ordersID.String()), ordersID, time.Minute); !errors.Is(err, ErrTTL) {
		t.Fatalf("1m TTL: err = %v, want ErrTTL", err)
	}
}

func TestCheckTTL(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	issuerEnd := now.Add(30 * 24 * time.Hour)
	for _, tc := range []struct {
		ttl     time.Duration
		wantErr bool
	}{
		{4*time.Minute + 59*time.Second, true},
		{MinWorkloadTTL, false},
		{24 * time.Hour, false},
		{30 * 24 * time.Hour, false},
		{30*24*time.Hour + time.Second, true},
		{-time.Hour, true},
	} {
		err := CheckTTL(tc.ttl, now, issuerEnd)
		if (err != nil) != tc.wantErr {
			t.Errorf("CheckTTL(%v) = %v, wantErr %v", tc.ttl, err, tc.wantErr)
		}
		if err != nil && !errors.Is(err, ErrTTL) {
			t.Errorf("CheckTTL(%v) error %v does not wrap ErrTTL", tc.ttl, err)
		}
	}
}

func TestShouldRotate(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(300 * time.Hour)
	for _, tc := range []struct {
		now  time.Time
		want bool
	}{
		{nb, false},
		{nb.Add(199 * time.Hour), false},
		{nb.Add(200*time.Hour - time.Nanosecond), false},
		{nb.Add(200 * time.Hour), true},
		{na, true},
		{na.Add(time.Hour), true},
	} {
		if got := ShouldRotate(tc.now, nb, na); got != tc.want {
			t.Errorf("ShouldRotate(%v) = %v, want %v", tc.now.Sub(nb), got, tc.want)
		}
	}
}

func TestIntermediateRenewsAtTwoThirdsAndOldCertsStillVerify(t *testing.T) {
	c, clock := newTestCA(t)
	first := c.Issuer()
	before := sign(t, c, ordersID)

	clock.Advance(200 * 24 * time.Hour) // < 2/3 of a year
	if rotated, err := c.RotateIntermediateIfDue(); err != nil || rotated {
		t.Fatalf("rotated early: %v, %v", rotated, err)
	}
	// A certificate issued just before the renewal.
	clock.Advance(43 * 24 * time.Hour) // day 243 ≈ 2/3 of 365
	justBefore := sign(t, c, ordersID)
	clock.Advance(24 * time.Hour)
	if rotated, err := c.RotateIntermediateIfDue(); err != nil || !rotated {
		t.Fatalf("not rotated at 2/3 of the lifetime: %v, %v", rotated, err)
	}
	if c.Issuer().Equal(first) {
		t.Fatal("issuer unchanged after rotation")
	}
	after := sign(t, c, ordersID)
	if !after[1].Equal(c.Issuer()) {
		t.Fatal("new certificates are not issued by the new intermediate")
	}
	// The old intermediate still verifies certificates it issued; the root
	// is unchanged so the bundle is too.
	at := clock.Now().Add(-time.Hour)
	if _, err := verifyAt(justBefore, c.Bundle(), at); err != nil {
		t.Fatalf("certificate from the old intermediate no longer verifies: %v", err)
	}
	if _, err := verifyAt(after, c.Bundle(), clock.Now()); err != nil {
		t.Fatalf("certificate from the new intermediate does not verify: %v", err)
	}
	if _, err := verifyAt(before, c.Bundle(), clock.Now()); err == nil {
		t.Fatal("a 24h certificate from day 0 still verifies on day 244")
	}

	// The renewal survived on disk.
	loaded, err := Load(Config{StateDir: c.cfg.StateDir, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Issuer().Equal(c.Issuer()) {
		t.Fatal("renewed intermediate not persisted")
	}
}

func TestRootRotationSteps(t *testing.T) {
	c, clock := newTestCA(t)
	oldRoot := c.Bundle()[0]

	if err := c.ActivateRoot(false); !errors.Is(err, ErrRotationOrder) {
		t.Fatalf("activate before prepare: %v, want ErrRotationOrder", err)
	}
	if err := c.RetireRoot(false); !errors.Is(err, ErrRotationOrder) {
		t.Fatalf("retire before activate: %v, want ErrRotationOrder", err)
	}

	// Step 1: prepare. A certificate issued before still verifies; issuance
	// is unchanged; the bundle holds both roots.
	beforePrepare := sign(t, c, ordersID)
	clock.Advance(time.Hour)
	if err := c.PrepareRoot(nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.PrepareRoot(nil, nil, 0); !errors.Is(err, ErrRotationOrder) {
		t.Fatalf("second prepare: %v, want ErrRotationOrder", err)
	}
	if n := len(c.Bundle()); n != 2 {
		t.Fatalf("bundle holds %d roots after prepare, want 2", n)
	}
	if _, err := verifyAt(beforePrepare, c.Bundle(), clock.Now()); err != nil {
		t.Fatalf("after prepare: %v", err)
	}
	if got := sign(t, c, ordersID); got[1].CheckSignatureFrom(oldRoot) != nil {
		t.Fatal("issuance switched to the new root at prepare")
	}

	// Step 2: activate refuses while a certificate from before prepare
	// (whose workload lacks the new root) may be valid; then it switches
	// issuance. Old-root certificates still verify; new ones chain to the
	// new root.
	if err := c.ActivateRoot(false); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("activate while pre-prepare certificates are valid: %v, want a refusal naming --force", err)
	}
	clock.Advance(DefaultWorkloadTTL + leafExpirySlack)
	beforeActivate := sign(t, c, ordersID)
	clock.Advance(time.Hour)
	if err := c.ActivateRoot(false); err != nil {
		t.Fatal(err)
	}
	if _, err := verifyAt(beforeActivate, c.Bundle(), clock.Now()); err != nil {
		t.Fatalf("after activate: %v", err)
	}
	afterActivate := sign(t, c, ordersID)
	if afterActivate[1].CheckSignatureFrom(oldRoot) == nil {
		t.Fatal("still issuing from the old root after activate")
	}

	// Step 3: retire refuses while old-root certificates may be valid.
	clock.Advance(time.Hour)
	if err := c.RetireRoot(false); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("retire with live old-root certificates: %v, want a refusal naming --force", err)
	}
	clock.Advance(DefaultWorkloadTTL + leafExpirySlack)
	if err := c.RetireRoot(false); err != nil {
		t.Fatal(err)
	}
	if b := c.Bundle(); len(b) != 1 || b[0].Equal(oldRoot) {
		t.Fatal("old root still in the bundle after retire")
	}
	// Certificates issued under the new root before retirement still verify.
	if _, err := verifyAt(afterActivate, c.Bundle(), clock.Now().Add(-2*time.Hour)); err != nil {
		t.Fatalf("after retire: %v", err)
	}
	if _, err := verifyAt(beforeActivate, c.Bundle(), beforeActivate[0].NotAfter.Add(-time.Minute)); err == nil {
		t.Fatal("old-root certificate verifies after its root was retired")
	}
}

func TestRestartKeepsRootAndIntermediate(t *testing.T) {
	c, clock := newTestCA(t)
	chain := sign(t, c, ordersID)
	loaded, err := Load(Config{StateDir: c.cfg.StateDir, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Bundle()[0].Equal(c.Bundle()[0]) || !loaded.Issuer().Equal(c.Issuer()) {
		t.Fatal("restart changed the root or intermediate")
	}
	if _, err := verifyAt(chain, loaded.Bundle(), clock.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(Config{StateDir: c.cfg.StateDir}, InitOptions{TrustDomain: "cluster.local"}); !errors.Is(err, ErrAlreadyInitialized) {
		t.Fatalf("second init: %v, want ErrAlreadyInitialized", err)
	}
}

func TestStateFilePermissions(t *testing.T) {
	c, _ := newTestCA(t)
	fi, err := os.Stat(filepath.Join(c.cfg.StateDir, stateFileName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("ca.json mode %v, want 0600 (it holds private keys)", fi.Mode().Perm())
	}
	bundle, err := os.ReadFile(BundlePath(c.cfg.StateDir))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := certpem.ParseCerts(bundle)
	if err != nil || len(roots) != 1 || !roots[0].Equal(c.Bundle()[0]) {
		t.Fatalf("bundle.pem does not hold the root: %v", err)
	}
}

func TestLoadErrorsNameTheFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(Config{StateDir: dir}); !errors.Is(err, ErrNotInitialized) || !strings.Contains(err.Error(), "trellis ca init") {
		t.Fatalf("missing state: %v", err)
	}
	c, _ := newTestCA(t)
	path := filepath.Join(c.cfg.StateDir, stateFileName)
	for name, content := range map[string]string{
		"truncated":  `{"version":1,"trustDomain":"cluster.local","roots":[`,
		"wrong kind": `{"version":1,"trustDomain":"cluster.local","roots":[{"status":"active","cert":"not pem"}]}`,
		"future":     `{"version":7}`,
		"no active":  `{"version":1,"trustDomain":"cluster.local","roots":[]}`,
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Load(Config{StateDir: c.cfg.StateDir})
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "corrupt") {
				t.Fatalf("err = %v, want a corruption error naming %s", err, path)
			}
		})
	}
}

func TestInitWithSuppliedRoot(t *testing.T) {
	src, clock := newTestCA(t)
	p := src.cur.Load()
	rootPEM := certpem.EncodeCerts(p.roots[0].cert)
	rootKeyPEM, _ := certpem.EncodeKey(p.roots[0].key)
	interPEM := certpem.EncodeCerts(p.issuer.cert)
	interKeyPEM, _ := certpem.EncodeKey(p.issuer.key)
	cfg := func() Config { return Config{StateDir: t.TempDir(), Now: clock.Now} }

	t.Run("root and key", func(t *testing.T) {
		c, err := Init(cfg(), InitOptions{TrustDomain: "cluster.local", RootCertPEM: rootPEM, RootKeyPEM: rootKeyPEM})
		if err != nil {
			t.Fatal(err)
		}
		if !c.Bundle()[0].Equal(p.roots[0].cert) {
			t.Fatal("supplied root not used")
		}
		if _, err := verifyAt(sign(t, c, ordersID), src.Bundle(), clock.Now()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("root certificate and intermediate pair", func(t *testing.T) {
		c, err := Init(cfg(), InitOptions{TrustDomain: "cluster.local", RootCertPEM: rootPEM, IntermediateCertPEM: interPEM, IntermediateKeyPEM: interKeyPEM})
		if err != nil {
			t.Fatal(err)
		}
		if !c.Issuer().Equal(p.issuer.cert) {
			t.Fatal("supplied intermediate not used")
		}
		if _, err := verifyAt(sign(t, c, ordersID), src.Bundle(), clock.Now()); err != nil {
			t.Fatal(err)
		}
		clock.Advance(340 * 24 * time.Hour)
		defer clock.Advance(-340 * 24 * time.Hour)
		if rotated, err := c.RotateIntermediateIfDue(); rotated || err != nil {
			t.Fatalf("rotated a supplied intermediate: %v %v", rotated, err)
		}
		if w := c.Status().Warnings; len(w) == 0 || !strings.Contains(strings.Join(w, "\n"), "cannot renew") {
			t.Fatalf("no warning about the unrenewable intermediate: %v", w)
		}
	})
	otherKey, _ := certpem.EncodeKey(ecKey(t))
	for name, opts := range map[string]InitOptions{
		"mismatched key":           {RootCertPEM: rootPEM, RootKeyPEM: otherKey},
		"key without cert":         {RootKeyPEM: rootKeyPEM},
		"root without any key":     {RootCertPEM: rootPEM},
		"intermediate as root":     {RootCertPEM: certpem.EncodeCerts(sign(t, src, ordersID)[0]), RootKeyPEM: otherKey},
		"intermediate, no root":    {IntermediateCertPEM: interPEM, IntermediateKeyPEM: interKeyPEM},
		"intermediate, wrong root": {RootCertPEM: certpem.EncodeCerts(mustRoot(t, clock.Now())), RootKeyPEM: nil, IntermediateCertPEM: interPEM, IntermediateKeyPEM: interKeyPEM},
	} {
		t.Run(name, func(t *testing.T) {
			opts.TrustDomain = "cluster.local"
			dir := t.TempDir()
			if _, err := Init(Config{StateDir: dir, Now: clock.Now}, opts); err == nil {
				t.Fatal("Init succeeded")
			}
			if _, err := os.Stat(filepath.Join(dir, stateFileName)); err == nil {
				t.Fatal("a failed init left a state file behind")
			}
		})
	}
}

func mustRoot(t *testing.T, now time.Time) *x509.Certificate {
	cert, _, err := newRoot(td, now, time.Hour*24*365)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func TestStatusWarnsBeforeExpiry(t *testing.T) {
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	c, err := Init(Config{StateDir: t.TempDir(), Now: clock.Now}, InitOptions{TrustDomain: "cluster.local", RootTTL: 60 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if w := c.Status().Warnings; len(w) != 0 {
		t.Fatalf("warnings on a fresh CA: %v", w)
	}
	clock.Advance(31 * 24 * time.Hour)
	if w := c.Status().Warnings; len(w) == 0 || !strings.Contains(w[0], "rotate-root") {
		t.Fatalf("no root expiry warning 29 days ahead: %v", w)
	}
}

func TestReloadPicksUpAnotherProcessRotation(t *testing.T) {
	c, clock := newTestCA(t)
	cli, err := Load(Config{StateDir: c.cfg.StateDir, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.PrepareRoot(nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := cli.ActivateRoot(false); err != nil {
		t.Fatal(err)
	}
	changed, err := c.Reload()
	if err != nil || !changed {
		t.Fatalf("Reload = %v, %v; want the other process's rotation", changed, err)
	}
	if !c.Issuer().Equal(cli.Issuer()) || len(c.Bundle()) != 2 {
		t.Fatal("reloaded CA does not issue from the new root")
	}
}

func FuzzValidateCSR(f *testing.F) {
	key := ecKey(f)
	f.Add(newCSR(f, key, ordersID.String()))
	f.Add(newCSR(f, key, ordersID.String(), "spiffe://cluster.local/ns/x/sa/y"))
	f.Add(newCSR(f, key))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, err := ValidateCSR(der, ordersID)
		if err != nil {
			if !errors.Is(err, ErrInvalidCSR) {
				t.Fatalf("error %v does not wrap ErrInvalidCSR", err)
			}
			return
		}
		// Whatever passes must be exactly what we promise to sign.
		if len(csr.URIs) != 1 || csr.URIs[0].String() != ordersID.String() {
			t.Fatalf("accepted CSR with URIs %v", csr.URIs)
		}
		if checkPublicKey(csr.PublicKey) != nil {
			t.Fatal("accepted a weak key")
		}
	})
}

func BenchmarkSign(b *testing.B) {
	c, err := Init(Config{StateDir: b.TempDir()}, InitOptions{TrustDomain: "cluster.local"})
	if err != nil {
		b.Fatal(err)
	}
	csr := newCSR(b, ecKey(b), ordersID.String())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Sign(csr, ordersID, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "signatures/s")
}

func TestRetireWithoutIssuedCertificatesNeedsNoWait(t *testing.T) {
	c, _ := newTestCA(t)
	if err := c.PrepareRoot(nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.ActivateRoot(false); err != nil {
		t.Fatal(err)
	}
	if err := c.RetireRoot(false); err != nil {
		t.Fatalf("nothing was issued under the old root, yet retire refused: %v", err)
	}
}

func TestSignRefusesBeforeTheIntermediateIsValid(t *testing.T) {
	c, clock := newTestCA(t)
	clock.Advance(-time.Hour)
	if _, err := c.Sign(newCSR(t, ecKey(t), ordersID.String()), ordersID, 0); err == nil || !strings.Contains(err.Error(), "clock") {
		t.Fatalf("signing before the intermediate's NotBefore: %v", err)
	}
}

func TestInitRefusesAnIntermediateTooShortForWorkloads(t *testing.T) {
	_, err := Init(Config{StateDir: t.TempDir(), IntermediateTTL: 36 * time.Hour}, InitOptions{TrustDomain: "cluster.local"})
	if err == nil || !strings.Contains(err.Error(), "at least 72h") {
		t.Fatalf("36h intermediate for 24h workloads: %v", err)
	}
}

func TestLoadRefusesAKeyThatDoesNotMatch(t *testing.T) {
	c, _ := newTestCA(t)
	path := filepath.Join(c.cfg.StateDir, stateFileName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatal(err)
	}
	other, _ := certpem.EncodeKey(ecKey(t))
	st.Issuer.Key = string(other)
	data, _ = json.Marshal(st)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(Config{StateDir: c.cfg.StateDir}); err == nil || !strings.Contains(err.Error(), "issuer.key does not match") {
		t.Fatalf("mismatched issuer key: %v", err)
	}
}
