package webhook

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	kjson "k8s.io/apimachinery/pkg/util/json"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
)

// FuzzServe feeds arbitrary bodies to the handler: it never panics and
// always answers; a 200 answers the request's uid, and a patch it admits
// applies to the pod and yields an injected pod.
// probePath is a container probe injection moves to the proxy.
var probePath = regexp.MustCompile(`^/spec/containers/[0-9]+/(liveness|readiness|startup)Probe$`)

func FuzzServe(f *testing.F) {
	f.Add(reviewOf(f, "a", "shipping", marshal(f, deploymentPod())))
	f.Add(reviewOf(f, "b", "legacy", marshal(f, barePod("legacy", map[string]string{inject.Annotation: "enabled"}))))
	f.Add(reviewOf(f, "c", "shipping", marshal(f, barePod("shipping", map[string]string{inject.ExcludeInboundPorts: "x"}))))
	f.Add(reviewOf(f, "d", "shipping", []byte(`{"metadata":{"name":"p","annotations":null},"spec":{"initContainers":null,"volumes":[null]}}`)))
	f.Add(reviewOf(f, "e", "shipping", []byte(`{"metadata":{"name":"p"},"spec":{"containers":[{"name":"a","image":"a","readinessProbe":{"httpGet":{"port":8080,"path":"/r"}}}]}}`)))
	f.Add(reviewOf(f, "e", "shipping", []byte(`{"metadata":{"Annotations":{"a":"b"},"name":"p"},"spec":{"Volumes":[]}}`)))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","resource":{"version":"v1","resource":"pods"},"operation":"CREATE","object":5}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, body []byte) {
		inj := newInjector(t)
		inj.Log = slog.New(slog.DiscardHandler)
		rec := post(t, inj, "application/json", body)
		switch rec.Code {
		case http.StatusOK:
		case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
			if strings.TrimSpace(rec.Body.String()) == "" {
				t.Fatalf("%d without a message", rec.Code)
			}
			return
		default:
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
		var req admissionv1.AdmissionReview
		if err := kjson.Unmarshal(body, &req); err != nil {
			t.Fatalf("answered 200 to a body that is not a review: %v", err)
		}
		resp := response(t, rec, string(req.Request.UID))
		if !resp.Allowed {
			if resp.Result == nil || resp.Result.Message == "" {
				t.Fatalf("refused without a message: %+v", resp)
			}
			return
		}
		if resp.Patch == nil {
			return
		}
		var ops []operation
		if err := json.Unmarshal(resp.Patch, &ops); err != nil {
			t.Fatal(err)
		}
		for _, op := range ops {
			switch {
			case op.Path == "/metadata/annotations", op.Path == "/spec/initContainers", op.Path == "/spec/volumes":
			case probePath.MatchString(op.Path) && op.Op == "replace":
			default:
				t.Fatalf("patch writes %s", op.Path)
			}
		}
		var got corev1.Pod
		if err := kjson.Unmarshal(applyPatch(t, req.Request.Object.Raw, resp.Patch), &got); err != nil {
			t.Fatalf("patched pod: %v", err)
		}
		if !inject.Injected(&got.Spec) || got.Annotations[inject.ProxyConfigAnnotation] == "" {
			t.Fatalf("patched pod is not injected: %s", resp.Patch)
		}
	})
}
