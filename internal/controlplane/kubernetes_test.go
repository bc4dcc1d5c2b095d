package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"testing"

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
