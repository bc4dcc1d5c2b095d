package ca

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/trellis-mesh/trellis/internal/certpem"

	"github.com/trellis-mesh/trellis/internal/statefile"
)

// StateFile is the file under the state directory that holds the whole
// CA, keys included: what a Kubernetes control plane keeps in a Secret.
const StateFile = stateFileName

// Files under the state directory.
const (
	stateFileName  = "ca.json"    // authoritative state, keys included: 0600
	lockFileName   = "ca.lock"    // serializes writers across processes
	bundleFileName = "bundle.pem" // every trusted root, for humans and --ca-bundle flags
	stateVersion   = 1
)

// Root statuses. A root rotation moves a new root through pending (trusted,
// not issuing) to active, and the old one through retiring (trusted, not
// issuing) to removed.
const (
	rootPending  = "pending"
	rootActive   = "active"
	rootRetiring = "retiring"
)

// ErrNotInitialized is returned by Load when the state directory holds no CA.
var ErrNotInitialized = errors.New("no certificate authority here")

// ErrAlreadyInitialized is returned by Init when the state directory already
// holds a CA; Init never replaces a root silently.
var ErrAlreadyInitialized = errors.New("a certificate authority already exists here")

// state is what ca.json holds. Certificates and keys are PEM so an operator
// can read them out with jq when something goes wrong.
type state struct {
	Version     int         `json:"version"`
	TrustDomain string      `json:"trustDomain"`
	Roots       []rootState `json:"roots"`
	Issuer      issuerState `json:"issuer"`
}

type rootState struct {
	Status string `json:"status"`
	Cert   string `json:"cert"`
	// Key is empty when the operator kept the root key offline and supplied
	// an intermediate instead (Linkerd's trust anchor + issuer model).
	Key string `json:"key,omitempty"`
	// LeavesValidUntil is a conservative upper bound on the expiry of any
	// certificate issued under this root; retiring the root before then would
	// break workloads that have not renewed yet.
	LeavesValidUntil time.Time `json:"leavesValidUntil,omitzero"`
}

type issuerState struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
	// Supplied is true when the operator provided the intermediate; Trellis
	// renews only intermediates it generated from a root key it holds.
	Supplied bool `json:"supplied,omitempty"`
}

// parsedRoot and parsedIssuer are the decoded forms used at run time.
type parsedRoot struct {
	status           string
	cert             *x509.Certificate
	key              crypto.Signer // nil when not held
	leavesValidUntil time.Time
}

type parsedIssuer struct {
	cert     *x509.Certificate
	key      crypto.Signer
	root     *x509.Certificate // the root the intermediate chains to
	supplied bool
}

type parsedState struct {
	trustDomain string
	roots       []parsedRoot
	issuer      parsedIssuer
}

func (p *parsedState) activeRoot() *parsedRoot {
	for i := range p.roots {
		if p.roots[i].status == rootActive {
			return &p.roots[i]
		}
	}
	return nil
}

func (p *parsedState) rootWithStatus(status string) *parsedRoot {
	for i := range p.roots {
		if p.roots[i].status == status {
			return &p.roots[i]
		}
	}
	return nil
}

// readState loads and fully validates ca.json in dir. Any problem names the
// file and says what to do; a corrupt file is never replaced by a new CA.
func readState(dir string) (*parsedState, error) {
	path := filepath.Join(dir, stateFileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s does not exist; run 'trellis ca init --state-dir %s' to create one", ErrNotInitialized, path, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read CA state: %w", err)
	}
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("CA state file %s is corrupt: %s; restore it from a backup (a new CA would invalidate every workload certificate)", path, fmt.Sprintf(format, args...))
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, corrupt("%v", err)
	}
	if st.Version != stateVersion {
		return nil, corrupt("version %d, this trellis understands version %d", st.Version, stateVersion)
	}
	p := &parsedState{trustDomain: st.TrustDomain}
	active := 0
	for i, r := range st.Roots {
		certs, err := certpem.ParseCerts([]byte(r.Cert))
		if err != nil || len(certs) != 1 {
			return nil, corrupt("roots[%d].cert: %v", i, errOrCount(err, len(certs)))
		}
		pr := parsedRoot{status: r.Status, cert: certs[0], leavesValidUntil: r.LeavesValidUntil}
		if r.Key != "" {
			if pr.key, err = certpem.ParseKey([]byte(r.Key)); err != nil {
				return nil, corrupt("roots[%d].key: %v", i, err)
			}
			if !publicKeysEqual(pr.key.Public(), pr.cert.PublicKey) {
				return nil, corrupt("roots[%d].key does not match roots[%d].cert", i, i)
			}
		}
		switch r.Status {
		case rootActive:
			active++
		case rootPending, rootRetiring:
		default:
			return nil, corrupt("roots[%d].status %q is not one of active, pending, retiring", i, r.Status)
		}
		p.roots = append(p.roots, pr)
	}
	if active != 1 {
		return nil, corrupt("%d active roots, want exactly one", active)
	}
	certs, err := certpem.ParseCerts([]byte(st.Issuer.Cert))
	if err != nil || len(certs) != 1 {
		return nil, corrupt("issuer.cert: %v", errOrCount(err, len(certs)))
	}
	key, err := certpem.ParseKey([]byte(st.Issuer.Key))
	if err != nil {
		return nil, corrupt("issuer.key: %v", err)
	}
	if !publicKeysEqual(key.Public(), certs[0].PublicKey) {
		return nil, corrupt("issuer.key does not match issuer.cert")
	}
	p.issuer = parsedIssuer{cert: certs[0], key: key, supplied: st.Issuer.Supplied}
	for _, r := range p.roots {
		if certs[0].CheckSignatureFrom(r.cert) == nil {
			p.issuer.root = r.cert
			break
		}
	}
	if p.issuer.root == nil {
		return nil, corrupt("issuer certificate is not signed by any root in the state")
	}
	return p, nil
}

func errOrCount(err error, n int) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("%d certificates, want 1", n)
}

// writeState persists p to dir: ca.json atomically with mode 0600, then
// bundle.pem with every trusted root.
func writeState(dir string, p *parsedState) error {
	st := state{Version: stateVersion, TrustDomain: p.trustDomain}
	for _, r := range p.roots {
		rs := rootState{Status: r.status, Cert: string(certpem.EncodeCerts(r.cert)), LeavesValidUntil: r.leavesValidUntil}
		if r.key != nil {
			k, err := certpem.EncodeKey(r.key)
			if err != nil {
				return err
			}
			rs.Key = string(k)
		}
		st.Roots = append(st.Roots, rs)
	}
	k, err := certpem.EncodeKey(p.issuer.key)
	if err != nil {
		return err
	}
	st.Issuer = issuerState{Cert: string(certpem.EncodeCerts(p.issuer.cert)), Key: string(k), Supplied: p.issuer.supplied}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode CA state: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if err := statefile.WriteAtomic(filepath.Join(dir, stateFileName), append(data, '\n'), 0o600); err != nil {
		return err
	}
	return statefile.WriteAtomic(filepath.Join(dir, bundleFileName), certpem.EncodeCerts(p.bundle()...), 0o644)
}

func (p *parsedState) bundle() []*x509.Certificate {
	out := make([]*x509.Certificate, 0, len(p.roots))
	for _, r := range p.roots {
		out = append(out, r.cert)
	}
	return out
}

// BundlePath is where the PEM trust bundle of the CA in dir is written.
func BundlePath(dir string) string { return filepath.Join(dir, bundleFileName) }
