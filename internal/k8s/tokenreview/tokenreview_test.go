package tokenreview

import (
	"errors"
	"log/slog"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger { return slog.New(slog.NewTextHandler(testWriter{t}, nil)) }

// fakeAPI is a fake clientset whose TokenReview create answers with status
// (or err), and records the reviews it was sent.
type fakeAPI struct {
	*fake.Clientset
	sent []authenticationv1.TokenReviewSpec
}

func newFakeAPI(status authenticationv1.TokenReviewStatus, err error) *fakeAPI {
	f := &fakeAPI{Clientset: fake.NewClientset()}
	f.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		req := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
		f.sent = append(f.sent, req.Spec)
		if err != nil {
			return true, nil, err
		}
		resp := req.DeepCopy()
		resp.Status = status
		return true, resp, nil
	})
	return f
}

func podBound(ns, sa string, audiences ...string) authenticationv1.TokenReviewStatus {
	return authenticationv1.TokenReviewStatus{
		Authenticated: true,
		Audiences:     audiences,
		User: authenticationv1.UserInfo{
			Username: "system:serviceaccount:" + ns + ":" + sa,
			UID:      "6a0c4ed6-1f0e-4b8f-9d0d-3c2b1a0f9e8d",
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
			Extra: map[string]authenticationv1.ExtraValue{
				ExtraPodName: {"orders-api-7c9d8"},
				ExtraPodUID:  {"0b5e1c3a-8f7d-4e2b-a1c9-5d6e7f8a9b0c"},
				"authentication.kubernetes.io/credential-id": {"JTI=3f2a"},
			},
		},
	}
}

func without(s authenticationv1.TokenReviewStatus, keys ...string) authenticationv1.TokenReviewStatus {
	s = *s.DeepCopy()
	for _, k := range keys {
		delete(s.User.Extra, k)
	}
	return s
}

func TestReview(t *testing.T) {
	good := podBound("shipping", "orders-api", "trellis")
	secretBound := without(good, ExtraPodName, ExtraPodUID)
	secretBound.User.Extra["authentication.kubernetes.io/secret-name"] = authenticationv1.ExtraValue{"orders-api-token"}
	twoPods := *good.DeepCopy()
	twoPods.User.Extra[ExtraPodName] = authenticationv1.ExtraValue{"a", "b"}
	refused := errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")

	tests := []struct {
		name     string
		token    string
		audience string
		status   authenticationv1.TokenReviewStatus
		apiErr   error
		// want is the identity, or empty with wantErr set.
		want Identity
		// wantErr is a part of the error's message; unauthenticated says
		// whether it must wrap ErrUnauthenticated.
		wantErr         string
		unauthenticated bool
		wantCalls       int
	}{
		{
			name: "pod-bound token", token: "jwt", status: good, wantCalls: 1,
			want: Identity{Namespace: "shipping", ServiceAccount: "orders-api", PodName: "orders-api-7c9d8", PodUID: "0b5e1c3a-8f7d-4e2b-a1c9-5d6e7f8a9b0c"},
		},
		{
			name: "audience of our choosing", token: "jwt", audience: "mesh-a", status: podBound("shipping", "orders-api", "mesh-a"), wantCalls: 1,
			want: Identity{Namespace: "shipping", ServiceAccount: "orders-api", PodName: "orders-api-7c9d8", PodUID: "0b5e1c3a-8f7d-4e2b-a1c9-5d6e7f8a9b0c"},
		},
		{
			name: "not authenticated", token: "jwt", wantCalls: 1,
			status:  authenticationv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"},
			wantErr: "service account token has expired", unauthenticated: true,
		},
		{
			name: "not authenticated, no reason", token: "jwt", wantCalls: 1,
			wantErr: "no reason given", unauthenticated: true,
		},
		{
			name: "token for another audience", token: "jwt", status: podBound("shipping", "orders-api", "other"), wantCalls: 1,
			wantErr: `not for audience "trellis"`, unauthenticated: true,
		},
		{
			// An authenticator without audience support answers none:
			// the token is the API server's own.
			name: "no audience in the answer", token: "jwt", status: podBound("shipping", "orders-api"), wantCalls: 1,
			wantErr: `not for audience "trellis"`, unauthenticated: true,
		},
		{
			name: "token for the default audience when ours is another", token: "jwt", audience: "mesh-a", status: good, wantCalls: 1,
			wantErr: `not for audience "mesh-a"`, unauthenticated: true,
		},
		{
			name: "a user, not a service account", token: "jwt", wantCalls: 1,
			status:  authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"trellis"}, User: authenticationv1.UserInfo{Username: "kubernetes-admin"}},
			wantErr: "not a service account", unauthenticated: true,
		},
		{
			name: "a node", token: "jwt", wantCalls: 1,
			status:  authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"trellis"}, User: authenticationv1.UserInfo{Username: "system:node:worker-1"}},
			wantErr: "not a service account", unauthenticated: true,
		},
		{
			name: "service account without a pod (Secret-based)", token: "jwt", status: secretBound, wantCalls: 1,
			wantErr: "not bound to a pod", unauthenticated: true,
		},
		{
			name: "pod name without pod UID", token: "jwt", status: without(good, ExtraPodUID), wantCalls: 1,
			wantErr: "not bound to a pod", unauthenticated: true,
		},
		{
			name: "two pod names", token: "jwt", status: twoPods, wantCalls: 1,
			wantErr: "not bound to a pod", unauthenticated: true,
		},
		{
			name: "API server unreachable", token: "jwt", apiErr: refused, wantCalls: 1,
			wantErr: "token review: dial tcp",
		},
		{
			name: "control plane not allowed to review", token: "jwt", wantCalls: 1,
			apiErr:  apierrors.NewForbidden(schema.GroupResource{Group: "authentication.k8s.io", Resource: "tokenreviews"}, "", errors.New("RBAC: no")),
			wantErr: "system:auth-delegator",
		},
		{
			name: "API server fails", token: "jwt", wantCalls: 1,
			apiErr:  apierrors.NewInternalError(errors.New("etcd timeout")),
			wantErr: "etcd timeout",
		},
		{
			name: "empty token", token: "", status: good,
			wantErr: "empty", unauthenticated: true,
		},
		{
			name: "absurdly long token", token: strings.Repeat("a", MaxTokenLength+1), status: good,
			wantErr: "more than the 16384", unauthenticated: true,
		},
		{
			name: "longest token", token: strings.Repeat("a", MaxTokenLength), status: good, wantCalls: 1,
			want: Identity{Namespace: "shipping", ServiceAccount: "orders-api", PodName: "orders-api-7c9d8", PodUID: "0b5e1c3a-8f7d-4e2b-a1c9-5d6e7f8a9b0c"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api := newFakeAPI(tt.status, tt.apiErr)
			a := Authenticator{Client: api.AuthenticationV1().TokenReviews(), TrustDomain: td, Audience: tt.audience, Log: testLogger(t)}
			got, err := a.Review(t.Context(), tt.token)
			if len(api.sent) != tt.wantCalls {
				t.Errorf("%d TokenReviews sent, want %d", len(api.sent), tt.wantCalls)
			}
			for _, spec := range api.sent {
				wantAud := tt.audience
				if wantAud == "" {
					wantAud = "trellis"
				}
				if diff := cmp.Diff(authenticationv1.TokenReviewSpec{Token: tt.token, Audiences: []string{wantAud}}, spec); diff != "" {
					t.Errorf("TokenReview spec (-want +got):\n%s", diff)
				}
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Review: %v", err)
				}
				if diff := cmp.Diff(tt.want, got); diff != "" {
					t.Errorf("identity (-want +got):\n%s", diff)
				}
				return
			}
			if err == nil {
				t.Fatalf("Review = %+v, want an error containing %q", got, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if errors.Is(err, identityservice.ErrUnauthenticated) != tt.unauthenticated {
				t.Errorf("error %q: wraps ErrUnauthenticated = %v, want %v", err, !tt.unauthenticated, tt.unauthenticated)
			}
			if got != (Identity{}) {
				t.Errorf("Review returned %+v with its error", got)
			}
		})
	}
}

func TestReviewKeepsTheAPIError(t *testing.T) {
	api := newFakeAPI(authenticationv1.TokenReviewStatus{}, syscall.ECONNREFUSED)
	a := Authenticator{Client: api.AuthenticationV1().TokenReviews(), TrustDomain: td}
	_, err := a.Review(t.Context(), "jwt")
	if !errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, identityservice.ErrUnauthenticated) {
		t.Fatalf("Review error %v: want the API error wrapped, not ErrUnauthenticated", err)
	}
}

func TestAuthenticate(t *testing.T) {
	api := newFakeAPI(podBound("shipping", "orders-api", "trellis"), nil)
	var a identityservice.Authenticator = Authenticator{Client: api.AuthenticationV1().TokenReviews(), TrustDomain: td, Log: testLogger(t)}
	if a.Type() != "kubernetes-service-account-token" {
		t.Errorf("Type = %q", a.Type())
	}
	id, err := a.Authenticate(t.Context(), "jwt")
	if err != nil {
		t.Fatal(err)
	}
	if want := "spiffe://cluster.local/ns/shipping/sa/orders-api"; id.String() != want {
		t.Errorf("Authenticate = %s, want %s", id, want)
	}

	api = newFakeAPI(without(podBound("shipping", "orders-api", "trellis"), ExtraPodName), nil)
	a = Authenticator{Client: api.AuthenticationV1().TokenReviews(), TrustDomain: td}
	if id, err := a.Authenticate(t.Context(), "jwt"); !errors.Is(err, identityservice.ErrUnauthenticated) {
		t.Errorf("Authenticate of a token without pod = %v, %v; want ErrUnauthenticated", id, err)
	}
}

func TestReviewWithoutClient(t *testing.T) {
	_, err := Authenticator{TrustDomain: td}.Review(t.Context(), "jwt")
	if err == nil || errors.Is(err, identityservice.ErrUnauthenticated) {
		t.Fatalf("Review without a client: %v; want a configuration error", err)
	}
}

func TestParseUsername(t *testing.T) {
	tests := []struct {
		username string
		ns, sa   string
		wantErr  string
	}{
		{username: "system:serviceaccount:shipping:orders-api", ns: "shipping", sa: "orders-api"},
		{username: "system:serviceaccount:kube-system:default", ns: "kube-system", sa: "default"},
		{username: "system:serviceaccount:a.b:c.d", ns: "a.b", sa: "c.d"},
		{username: "", wantErr: "not a service account"},
		{username: "kubernetes-admin", wantErr: "not a service account"},
		{username: "system:serviceaccounts:shipping", wantErr: "not a service account"},
		{username: "system:serviceaccount:shipping", wantErr: "not a service account"},
		{username: "system:serviceaccount:shipping:orders:api", wantErr: "not a service account"},
		{username: "system:serviceaccount::orders-api", wantErr: "namespace is empty"},
		{username: "system:serviceaccount:shipping:", wantErr: "service account is empty"},
		{username: "system:serviceaccount:Shipping:orders-api", wantErr: "not a valid name"},
		{username: "system:serviceaccount:shipping:orders/api", wantErr: "not a valid name"},
		{username: "SYSTEM:SERVICEACCOUNT:shipping:orders-api", wantErr: "not a service account"},
	}
	for _, tt := range tests {
		ns, sa, err := ParseUsername(tt.username)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseUsername(%q) = %q, %q, %v; want an error containing %q", tt.username, ns, sa, err, tt.wantErr)
			}
			continue
		}
		if err != nil || ns != tt.ns || sa != tt.sa {
			t.Errorf("ParseUsername(%q) = %q, %q, %v; want %q, %q", tt.username, ns, sa, err, tt.ns, tt.sa)
		}
	}
}

func FuzzParseUsername(f *testing.F) {
	for _, s := range []string{
		"system:serviceaccount:shipping:orders-api",
		"system:serviceaccount:a:b:c",
		"system:serviceaccount::",
		"system:serviceaccount:x:",
		"system:node:worker-1",
		"kubernetes-admin",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, username string) {
		ns, sa, err := ParseUsername(username)
		if err != nil {
			if ns != "" || sa != "" {
				t.Fatalf("ParseUsername(%q) returned %q, %q with error %v", username, ns, sa, err)
			}
			return
		}
		// Whatever is accepted names exactly one service account, and one
		// a workload SPIFFE ID can carry and give back.
		if got := "system:serviceaccount:" + ns + ":" + sa; got != username {
			t.Fatalf("ParseUsername(%q) = %q, %q, which is %q", username, ns, sa, got)
		}
		id, err := meshid.Workload(td, ns, sa)
		if err != nil {
			t.Fatalf("ParseUsername(%q) accepted %q, %q, which meshid refuses: %v", username, ns, sa, err)
		}
		gotNS, gotSA, err := meshid.Parse(id)
		if err != nil || gotNS != ns || gotSA != sa {
			t.Fatalf("%s parses back as %q, %q, %v", id, gotNS, gotSA, err)
		}
	})
}
