// Package jointoken issues and redeems bootstrap tokens: short secrets bound
// to one workload identity (namespace + service account) that a workload
// outside Kubernetes presents once to obtain its first certificate. Only a
// SHA-256 hash of each secret is stored; tokens expire and have a bounded
// number of uses.
package jointoken

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/statefile"
)

const (
	prefix      = "trellis-jt1"
	idBytes     = 6
	secretBytes = 32
	fileName    = "tokens.json"
	lockName    = "tokens.lock"
	// MaxTTL bounds how long a bootstrap token may live: it is a bearer
	// secret, meant to be used within minutes of being made.
	MaxTTL = 30 * 24 * time.Hour
)

// ErrInvalid is wrapped by every redemption failure.
var ErrInvalid = errors.New("invalid join token")

// Token is the stored record of a join token; the secret is not in it.
type Token struct {
	ID             string    `json:"id"`
	SecretSHA256   string    `json:"secretSha256"`
	Namespace      string    `json:"namespace"`
	ServiceAccount string    `json:"serviceAccount"`
	CreatedAt      time.Time `json:"createdAt"`
	ExpiresAt      time.Time `json:"expiresAt"`
	// UsesLeft counts the redemptions still allowed.
	UsesLeft int `json:"usesLeft"`
}

// Store keeps join tokens in a file under a state directory.
type Store struct {
	dir string
	now func() time.Time
}

// NewStore returns a store in dir; now may be nil for time.Now.
func NewStore(dir string, now func() time.Time) *Store {
	if now == nil {
		now = time.Now
	}
	return &Store{dir: dir, now: now}
}

// Create makes a token for namespace/serviceAccount valid for ttl and uses
// redemptions, and returns the secret token string (shown once) and its record.
func (s *Store) Create(namespace, serviceAccount string, ttl time.Duration, uses int) (string, Token, error) {
	if err := meshid.ValidateName("namespace", namespace); err != nil {
		return "", Token{}, fmt.Errorf("create join token: %w", err)
	}
	if err := meshid.ValidateName("service account", serviceAccount); err != nil {
		return "", Token{}, fmt.Errorf("create join token: %w", err)
	}
	if namespace == meshid.RootNamespace && serviceAccount == meshid.ControlPlaneServiceAccount {
		return "", Token{}, fmt.Errorf("create join token: %s/%s is the control plane's own identity and is never issued to workloads", namespace, serviceAccount)
	}
	if ttl <= 0 || ttl > MaxTTL {
		return "", Token{}, fmt.Errorf("create join token: ttl %v must be more than 0 and at most %v", ttl, MaxTTL)
	}
	if uses < 1 {
		return "", Token{}, fmt.Errorf("create join token: uses %d must be at least 1", uses)
	}
	id := make([]byte, idBytes)
	secret := make([]byte, secretBytes)
	if _, err := rand.Read(id); err != nil {
		return "", Token{}, fmt.Errorf("create join token: %w", err)
	}
	if _, err := rand.Read(secret); err != nil {
		return "", Token{}, fmt.Errorf("create join token: %w", err)
	}
	now := s.now()
	tok := Token{
		ID:             hex.EncodeToString(id),
		SecretSHA256:   hashSecret(secret),
		Namespace:      namespace,
		ServiceAccount: serviceAccount,
		CreatedAt:      now.UTC(),
		ExpiresAt:      now.Add(ttl).UTC(),
		UsesLeft:       uses,
	}
	err := s.update(func(tokens []Token) ([]Token, error) { return append(tokens, tok), nil })
	if err != nil {
		return "", Token{}, fmt.Errorf("create join token: %w", err)
	}
	return prefix + "." + tok.ID + "." + base64.RawURLEncoding.EncodeToString(secret), tok, nil
}

// Redeem checks token and consumes one use. It returns the identity the token
// is bound to.
func (s *Store) Redeem(token string) (Token, error) {
	id, secret, err := Parse(token)
	if err != nil {
		return Token{}, err
	}
	now := s.now()
	var redeemed Token
	err = s.update(func(tokens []Token) ([]Token, error) {
		i := slices.IndexFunc(tokens, func(t Token) bool { return t.ID == id })
		if i < 0 {
			return nil, fmt.Errorf("%w: unknown, revoked or used up", ErrInvalid)
		}
		t := &tokens[i]
		want, err := hex.DecodeString(t.SecretSHA256)
		if err != nil {
			return nil, fmt.Errorf("stored token %s is corrupt: %w", t.ID, err)
		}
		got := sha256.Sum256(secret)
		if subtle.ConstantTimeCompare(want, got[:]) != 1 {
			return nil, fmt.Errorf("%w: unknown, revoked or used up", ErrInvalid)
		}
		if t.UsesLeft <= 0 {
			return nil, fmt.Errorf("%w: unknown, revoked or used up", ErrInvalid)
		}
		if !now.Before(t.ExpiresAt) {
			return nil, fmt.Errorf("%w: expired at %s; create a new one with 'trellis token create'", ErrInvalid, t.ExpiresAt.Format(time.RFC3339))
		}
		t.UsesLeft--
		redeemed = *t
		return tokens, nil
	})
	if err != nil {
		return Token{}, err
	}
	return redeemed, nil
}

// List returns the live tokens.
func (s *Store) List() ([]Token, error) {
	tokens, err := s.read()
	if err != nil {
		return nil, err
	}
	now := s.now()
	return slices.DeleteFunc(tokens, func(t Token) bool { return dead(t, now) }), nil
}

// Revoke deletes the token with id.
func (s *Store) Revoke(id string) error {
	return s.update(func(tokens []Token) ([]Token, error) {
		n := len(tokens)
		tokens = slices.DeleteFunc(tokens, func(t Token) bool { return t.ID == id })
		if len(tokens) == n {
			return nil, fmt.Errorf("revoke join token: no token with id %q; 'trellis token list' shows them", id)
		}
		return tokens, nil
	})
}

// Parse splits a token string into its id and secret.
func Parse(token string) (id string, secret []byte, err error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 || parts[0] != prefix {
		return "", nil, fmt.Errorf("%w: not of the form %s.<id>.<secret>", ErrInvalid, prefix)
	}
	raw, err := hex.DecodeString(parts[1])
	if err != nil || len(raw) != idBytes || parts[1] != hex.EncodeToString(raw) {
		return "", nil, fmt.Errorf("%w: malformed id", ErrInvalid)
	}
	secret, err = base64.RawURLEncoding.Strict().DecodeString(parts[2])
	if err != nil || len(secret) != secretBytes {
		return "", nil, fmt.Errorf("%w: malformed secret", ErrInvalid)
	}
	return parts[1], secret, nil
}

func hashSecret(secret []byte) string {
	sum := sha256.Sum256(secret)
	return hex.EncodeToString(sum[:])
}

func dead(t Token, now time.Time) bool { return t.UsesLeft <= 0 || !now.Before(t.ExpiresAt) }

// update runs a locked read-modify-write of the token file, dropping tokens
// that are used up or expired.
func (s *Store) update(fn func([]Token) ([]Token, error)) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return err
	}
	unlock, err := statefile.Lock(filepath.Join(s.dir, lockName))
	if err != nil {
		return err
	}
	defer unlock()
	tokens, err := s.read()
	if err != nil {
		return err
	}
	tokens, err = fn(tokens)
	if err != nil {
		return err
	}
	now := s.now()
	tokens = slices.DeleteFunc(tokens, func(t Token) bool { return dead(t, now) })
	data, err := json.MarshalIndent(tokens, "", "  ")
	if err != nil {
		return err
	}
	return statefile.WriteAtomic(filepath.Join(s.dir, fileName), append(data, '\n'), 0o600)
}

func (s *Store) read() ([]Token, error) {
	path := filepath.Join(s.dir, fileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return []Token{}, nil
	}
	if err != nil {
		return nil, err
	}
	var tokens []Token
	if err := json.Unmarshal(data, &tokens); err != nil {
		return nil, fmt.Errorf("join token file %s is corrupt: %v; move it away (outstanding tokens stop working) or restore it", path, err)
	}
	return tokens, nil
}
