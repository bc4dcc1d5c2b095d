// Package tokenreview authenticates workloads by their pod's Kubernetes
// service account token. The token is not verified here: the API server that
// issued it is asked, with a TokenReview, whose it is, for which audience,
// and which pod it is bound to. Asking rather than verifying the JWT
// ourselves is what makes a deleted pod's token stop working at once, and
// keeps the control plane free of the cluster's signing keys and issuer
// configuration.
package tokenreview

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

const (
	// Type is the credential type handled, as sent by an injected proxy.
	Type = identity.CredentialKubernetes

	// MaxTokenLength bounds the token accepted. Real service account JWTs
	// are one to two KiB; the bound keeps a caller from making the control
	// plane forward megabytes to the API server for each request.
	MaxTokenLength = 16 << 10

	// Extra keys the API server sets on a token bound to a pod. Only
	// pod-bound tokens are revoked when their pod is deleted.
	ExtraPodName = "authentication.kubernetes.io/pod-name"
	ExtraPodUID  = "authentication.kubernetes.io/pod-uid"

	serviceAccountPrefix = "system:serviceaccount:"

	// reviewTimeout bounds one TokenReview so that an API server that
	// accepts the connection and never answers cannot hold a request, and
	// the proxy behind it, for as long as the caller's deadline allows
	// (or forever, without one).
	reviewTimeout = 10 * time.Second
)

// Reviewer creates TokenReviews. client-go's
// kubernetes.Interface.AuthenticationV1().TokenReviews() is one; this
// package needs only that method, so tests and other transports can supply
// it without a clientset.
type Reviewer interface {
	Create(ctx context.Context, review *authenticationv1.TokenReview, opts metav1.CreateOptions) (*authenticationv1.TokenReview, error)
}

// Authenticator checks Kubernetes service account tokens with the API
// server and maps them to workload SPIFFE IDs. It implements
// identityservice.Authenticator.
type Authenticator struct {
	Client      Reviewer
	TrustDomain spiffeid.TrustDomain
	// Audience the token must have been issued for; empty means
	// inject.TokenAudience, the audience injected pods' tokens have. It is
	// never left empty in the review: the API server would then check the
	// token against its own audiences and accept a token meant for it.
	Audience string
	// Log receives one line per accepted token naming the pod; nil
	// discards.
	Log *slog.Logger
}

var _ identityservice.Authenticator = Authenticator{}

// Identity is what a reviewed token proves: the service account it belongs
// to and the pod it is bound to.
type Identity struct {
	Namespace      string
	ServiceAccount string
	PodName        string
	PodUID         string
}

// Type implements identityservice.Authenticator.
func (Authenticator) Type() string { return Type }

// Authenticate implements identityservice.Authenticator: the SPIFFE ID of
// the service account whose pod-bound token credential is. An invalid token
// is an error wrapping identityservice.ErrUnauthenticated; any other error
// means the token could not be checked.
func (a Authenticator) Authenticate(ctx context.Context, credential string) (spiffeid.ID, error) {
	id, err := a.Review(ctx, credential)
	if err != nil {
		return spiffeid.ID{}, err
	}
	return meshid.Workload(a.TrustDomain, id.Namespace, id.ServiceAccount)
}

// Review asks the API server about token and returns whom it proves. It
// refuses, wrapping identityservice.ErrUnauthenticated, a token the API
// server does not accept, one not issued for the Authenticator's audience,
// one that is not a service account's, and one not bound to a pod. Errors
// talking to the API server do not wrap ErrUnauthenticated: the token may be
// fine.
func (a Authenticator) Review(ctx context.Context, token string) (Identity, error) {
	if token == "" {
		return Identity{}, fmt.Errorf("%w: the Kubernetes service account token is empty: the proxy sends its pod's projected token (audience %q), as 'trellis inject' mounts it", identityservice.ErrUnauthenticated, a.audience())
	}
	if len(token) > MaxTokenLength {
		return Identity{}, fmt.Errorf("%w: the Kubernetes service account token is %d bytes, more than the %d a service account token can be: send the pod's projected token file, not something else", identityservice.ErrUnauthenticated, len(token), MaxTokenLength)
	}
	if a.Client == nil {
		return Identity{}, errors.New("token review: no Kubernetes client configured")
	}
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	req := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{a.audience()}}}
	resp, err := a.Client.Create(ctx, req, metav1.CreateOptions{})
	if err != nil {
		if apierrors.IsForbidden(err) {
			return Identity{}, fmt.Errorf("token review: %w (the control plane's service account needs create on tokenreviews.authentication.k8s.io: bind it to the ClusterRole system:auth-delegator or apply the install manifests' RBAC)", err)
		}
		return Identity{}, fmt.Errorf("token review: %w", err)
	}
	if resp == nil {
		return Identity{}, errors.New("token review: the API server returned no review")
	}
	id, err := Decide(resp.Status, a.audience())
	if err != nil {
		return Identity{}, err
	}
	a.logger().Info("accepted Kubernetes service account token", "namespace", id.Namespace, "serviceAccount", id.ServiceAccount, "pod", id.PodName, "podUID", id.PodUID)
	return id, nil
}

// Decide judges the API server's answer to a TokenReview sent for audience:
// the identity the token proves, or an error wrapping
// identityservice.ErrUnauthenticated that says why not.
func Decide(status authenticationv1.TokenReviewStatus, audience string) (Identity, error) {
	if !status.Authenticated {
		reason := status.Error
		if reason == "" {
			reason = "no reason given"
		}
		return Identity{}, fmt.Errorf("%w: the Kubernetes API server did not accept the service account token (%s): a pod's token is refused once it expires or its pod is deleted, and a token for another audience always is; if the pod is running, check that its proxy sends the projected token with audience %q that 'trellis inject' mounts", identityservice.ErrUnauthenticated, reason, audience)
	}
	// The API server answers with the audiences the token has among those
	// asked for. An authenticator that does not know audiences answers
	// none: that token is valid for the API server itself, and a token
	// that could be replayed against the API server must not buy a
	// certificate, nor one of ours be usable there.
	if !slices.Contains(status.Audiences, audience) {
		return Identity{}, fmt.Errorf("%w: the service account token is not for audience %q (the API server found it valid for %q): mount a projected service account token with audience %q, as 'trellis inject' does", identityservice.ErrUnauthenticated, audience, status.Audiences, audience)
	}
	ns, sa, err := ParseUsername(status.User.Username)
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %v", identityservice.ErrUnauthenticated, err)
	}
	podName, okName := extraValue(status.User.Extra, ExtraPodName)
	podUID, okUID := extraValue(status.User.Extra, ExtraPodUID)
	if !okName || !okUID {
		return Identity{}, fmt.Errorf("%w: the token of service account %s/%s is not bound to a pod (a long-lived Secret-based token, or one requested without a pod): such a token outlives its workload, so it is not accepted; mount the projected token 'trellis inject' adds, which the API server revokes when the pod is deleted", identityservice.ErrUnauthenticated, ns, sa)
	}
	return Identity{Namespace: ns, ServiceAccount: sa, PodName: podName, PodUID: podUID}, nil
}

// extraValue returns the single non-empty value of key; anything else is
// treated as absent rather than guessing which of several values counts.
func extraValue(extra map[string]authenticationv1.ExtraValue, key string) (string, bool) {
	v := extra[key]
	if len(v) != 1 || v[0] == "" {
		return "", false
	}
	return v[0], true
}

// ParseUsername splits a service account's user name,
// system:serviceaccount:<namespace>:<name>, into its namespace and name, and
// checks both are names a workload SPIFFE ID can carry.
func ParseUsername(username string) (namespace, serviceAccount string, err error) {
	rest, ok := strings.CutPrefix(username, serviceAccountPrefix)
	if !ok {
		return "", "", fmt.Errorf("user %q is not a service account (want %s<namespace>:<name>): only a pod's service account token is accepted", username, serviceAccountPrefix)
	}
	namespace, serviceAccount, ok = strings.Cut(rest, ":")
	if !ok || strings.Contains(serviceAccount, ":") {
		return "", "", fmt.Errorf("user %q is not a service account (want %s<namespace>:<name>)", username, serviceAccountPrefix)
	}
	if err := meshid.ValidateName("namespace", namespace); err != nil {
		return "", "", fmt.Errorf("service account user %q: %w", username, err)
	}
	if err := meshid.ValidateName("service account", serviceAccount); err != nil {
		return "", "", fmt.Errorf("service account user %q: %w", username, err)
	}
	return namespace, serviceAccount, nil
}

func (a Authenticator) audience() string {
	if a.Audience == "" {
		return inject.TokenAudience
	}
	return a.Audience
}

func (a Authenticator) logger() *slog.Logger {
	if a.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return a.Log
}
