package e2e

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/tokenreview"
	"github.com/trellis-mesh/trellis/test/k8senv"
)

// TestTokenReview authenticates with tokens a real API server (1.34)
// issued through the TokenRequest API, as kubelet does for an injected
// pod's projected volume, and checks the authenticator takes exactly the
// pod-bound token for our audience, and stops taking it once the pod is
// gone.
func TestTokenReview(t *testing.T) {
	env := k8senv.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cfg, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	const ns, sa = "shipping", "orders-api"
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// No kubelet runs it: it stays Pending, which is all a bound token
	// needs.
	podSpec := corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "app", Image: "registry.example/orders-api:test"}}}
	pod, err := client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "orders-api-0"}, Spec: podSpec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// requestToken asks for a token as kubelet does for a projected
	// volume; bound to pod unless it is nil.
	requestToken := func(audience string, pod *corev1.Pod) string {
		t.Helper()
		req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{audience},
			ExpirationSeconds: ptr.To[int64](600), // the API server's minimum
		}}
		if pod != nil {
			req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
		}
		resp, err := client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("TokenRequest for audience %q: %v", audience, err)
		}
		return resp.Status.Token
	}
	auth := tokenreview.Authenticator{
		Client:      client.AuthenticationV1().TokenReviews(),
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"),
		Audience:    inject.TokenAudience,
		Log:         slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
	refused := func(what, token string) {
		t.Helper()
		id, err := auth.Review(ctx, token)
		if !errors.Is(err, identityservice.ErrUnauthenticated) {
			t.Fatalf("%s: Review = %+v, %v; want ErrUnauthenticated", what, id, err)
		}
		t.Logf("%s refused: %v", what, err)
	}

	podToken := requestToken(inject.TokenAudience, pod)
	id, err := auth.Authenticate(ctx, podToken)
	if err != nil {
		t.Fatalf("the pod's token: %v", err)
	}
	if want := "spiffe://cluster.local/ns/shipping/sa/orders-api"; id.String() != want {
		t.Errorf("Authenticate = %s, want %s", id, want)
	}
	who, err := auth.Review(ctx, podToken)
	if err != nil {
		t.Fatal(err)
	}
	if who != (tokenreview.Identity{Namespace: ns, ServiceAccount: sa, PodName: pod.Name, PodUID: string(pod.UID)}) {
		t.Errorf("Review = %+v, want the pod %s (%s)", who, pod.Name, pod.UID)
	}

	refused("a token for audience other", requestToken("other", pod))
	refused("a token bound to no pod", requestToken(inject.TokenAudience, nil))
	refused("a garbage token", "not.a.jwt")

	// The long-lived token of a Secret, which kube-controller-manager's
	// token controller fills in: valid until the Secret is deleted,
	// whatever happens to the pods, so never good enough.
	secret, err := client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: sa + "-token", Annotations: map[string]string{corev1.ServiceAccountNameKey: sa}},
		Type:       corev1.SecretTypeServiceAccountToken,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var legacyToken string
	waitFor(t, 30*time.Second, "the token controller to fill in the Secret's token", func() bool {
		s, err := client.CoreV1().Secrets(ns).Get(ctx, secret.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		legacyToken = string(s.Data[corev1.ServiceAccountTokenKey])
		return legacyToken != ""
	})
	refused("a Secret-based token", legacyToken)

	// The API server checks the bound pod, by name and UID, at each
	// review: deleting it revokes the token. A pod not bound to a node is
	// deleted at once, but the API server keeps a successful
	// authentication for ten seconds (kube-apiserver's token success
	// cache), so the refusal is waited for, not expected at once.
	if err := client.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("pod after delete: %v; want it gone", err)
	}
	deleted := time.Now()
	quiet := auth
	quiet.Log = nil
	var reviewErr error
	waitFor(t, 30*time.Second, "the deleted pod's token to be refused", func() bool {
		_, reviewErr = quiet.Review(ctx, podToken)
		if reviewErr != nil && !errors.Is(reviewErr, identityservice.ErrUnauthenticated) {
			t.Fatalf("reviewing the deleted pod's token: %v", reviewErr)
		}
		return reviewErr != nil
	})
	t.Logf("the deleted pod's token refused %v after the pod was deleted: %v", time.Since(deleted).Round(time.Second), reviewErr)

	// A new pod of the same name is a new pod (new UID): the old pod's
	// token stays revoked.
	again, err := client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: pod.Name}, Spec: podSpec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if again.UID == pod.UID {
		t.Fatal("the recreated pod has the old pod's UID")
	}
	refused("the deleted pod's token once a pod of the same name exists again", podToken)
	if _, err := auth.Authenticate(ctx, requestToken(inject.TokenAudience, again)); err != nil {
		t.Errorf("the new pod's token: %v", err)
	}
}
