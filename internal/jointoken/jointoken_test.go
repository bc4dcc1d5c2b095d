package jointoken

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCreateRedeemSingleUse(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := NewStore(dir, func() time.Time { return now })
	tok, rec, err := s.Create("shipping", "orders-api", time.Hour, 1)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(filepath.Join(dir, fileName))
	_, secret, _ := Parse(tok)
	if strings.Contains(string(data), strings.Split(tok, ".")[2]) || len(secret) == 0 {
		t.Fatal("the token secret is stored in clear")
	}
	if fi, _ := os.Stat(filepath.Join(dir, fileName)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := s.Redeem(tok)
	if err != nil {
		t.Fatal(err)
	}
	if got.Namespace != "shipping" || got.ServiceAccount != "orders-api" || got.ID != rec.ID {
		t.Fatalf("redeemed %+v", got)
	}
	if _, err := s.Redeem(tok); !errors.Is(err, ErrInvalid) {
		t.Fatalf("second redemption of a single-use token: %v", err)
	}
}

func TestRedeemBoundsAndExpiry(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := NewStore(t.TempDir(), func() time.Time { return now })
	tok, _, err := s.Create("shipping", "orders-api", time.Hour, 3)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := s.Redeem(tok); err != nil {
			t.Fatalf("use %d: %v", i+1, err)
		}
	}
	if _, err := s.Redeem(tok); !errors.Is(err, ErrInvalid) {
		t.Fatalf("fourth use of a 3-use token: %v", err)
	}

	expiring, _, err := s.Create("shipping", "orders-api", time.Hour, 5)
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Hour)
	if _, err := s.Redeem(expiring); !errors.Is(err, ErrInvalid) {
		t.Fatalf("expired token: %v", err)
	}
	if live, _ := s.List(); len(live) != 0 {
		t.Fatalf("List shows dead tokens: %+v", live)
	}
}

func TestRedeemRejectsForgedSecret(t *testing.T) {
	s := NewStore(t.TempDir(), nil)
	tok, _, err := s.Create("shipping", "orders-api", time.Hour, 1)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	forged := parts[0] + "." + parts[1] + "." + strings.Repeat("A", len(parts[2]))
	if _, err := s.Redeem(forged); !errors.Is(err, ErrInvalid) {
		t.Fatalf("forged secret: %v", err)
	}
	if _, err := s.Redeem(tok); err != nil {
		t.Fatalf("a forged attempt consumed the real token: %v", err)
	}
}

func TestRevoke(t *testing.T) {
	s := NewStore(t.TempDir(), nil)
	tok, rec, err := s.Create("shipping", "orders-api", time.Hour, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Revoke(rec.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Redeem(tok); !errors.Is(err, ErrInvalid) {
		t.Fatalf("revoked token redeemed: %v", err)
	}
	if err := s.Revoke(rec.ID); err == nil {
		t.Fatal("revoking an unknown id succeeded")
	}
}

func TestCreateValidates(t *testing.T) {
	s := NewStore(t.TempDir(), nil)
	for _, tc := range []struct {
		ns, sa string
		ttl    time.Duration
		uses   int
	}{
		{"", "sa", time.Hour, 1},
		{"ns", "Bad", time.Hour, 1},
		{"ns", "sa", 0, 1},
		{"ns", "sa", MaxTTL + time.Second, 1},
		{"ns", "sa", time.Hour, 0},
	} {
		if _, _, err := s.Create(tc.ns, tc.sa, tc.ttl, tc.uses); err == nil {
			t.Errorf("Create(%q, %q, %v, %d) succeeded", tc.ns, tc.sa, tc.ttl, tc.uses)
		}
	}
}

func TestCorruptFileIsAnError(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, fileName), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := NewStore(dir, nil).Create("ns", "sa", time.Hour, 1)
	if err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("err = %v, want a corruption error", err)
	}
}

func FuzzParse(f *testing.F) {
	s := NewStore(f.TempDir(), nil)
	tok, _, err := s.Create("ns", "sa", time.Hour, 1)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(tok)
	f.Add("trellis-jt1..")
	f.Add("trellis-jt1.0011223344zz.AAAA")
	f.Add("")
	f.Fuzz(func(t *testing.T, token string) {
		id, secret, err := Parse(token)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if len(id) != 2*idBytes || len(secret) != secretBytes {
			t.Fatalf("accepted id %q secret of %d bytes", id, len(secret))
		}
	})
}
