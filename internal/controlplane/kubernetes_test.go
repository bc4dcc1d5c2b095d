package controlplane

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/trellis-mesh/trellis/internal/ca"
)

// Of control planes that made a CA at the same time, the first to create
// the Secret wins; the others learn they lost and take its CA.
func TestClaimCA(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ca.StateFile), []byte(`{"mine":true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset()
	k := &Kubernetes{Client: client, CASecret: "trellis-system/trellis-ca"}
	won, err := claimCA(k, dir)
	if err != nil || !won {
		t.Fatalf("first claim: won %v, %v", won, err)
	}
	sec, err := client.CoreV1().Secrets("trellis-system").Get(context.Background(), "trellis-ca", metav1.GetOptions{})
	if err != nil || string(sec.Data[ca.StateFile]) != `{"mine":true}` {
		t.Fatalf("secret after the first claim: %v, %v", sec, err)
	}
	// Another control plane's claim, with a CA of its own.
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, ca.StateFile), []byte(`{"theirs":true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if won, err := claimCA(k, other); err != nil || won {
		t.Fatalf("second claim: won %v, %v; want lost", won, err)
	}
	if err := os.Remove(filepath.Join(other, ca.StateFile)); err != nil {
		t.Fatal(err)
	}
	if err := restoreCA(k, other); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(other, ca.StateFile)); string(got) != `{"mine":true}` {
		t.Errorf("the loser restored %s, want the winner's CA", got)
	}
}

// A follower takes the leader's CA from the Secret when it differs (the
// leader rotated its intermediate), and signs under it from then on.
func TestFollowCA(t *testing.T) {
	leaderDir, followerDir := t.TempDir(), t.TempDir()
	leader, err := ca.Init(ca.Config{StateDir: leaderDir}, ca.InitOptions{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	follower, err := ca.Init(ca.Config{StateDir: followerDir}, ca.InitOptions{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(leaderDir, ca.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "trellis-ca", Namespace: "trellis-system"}, Data: map[string][]byte{ca.StateFile: data}})
	cp := &ControlPlane{ca: follower, cfg: &Config{StateDir: followerDir}, log: slog.New(slog.DiscardHandler)}
	if err := cp.followCA(context.Background(), client.CoreV1().Secrets("trellis-system"), "trellis-ca", filepath.Join(followerDir, ca.StateFile)); err != nil {
		t.Fatal(err)
	}
	if !follower.Issuer().Equal(leader.Issuer()) || !follower.Bundle()[0].Equal(leader.Bundle()[0]) {
		t.Error("the follower still signs under its own CA")
	}
}
