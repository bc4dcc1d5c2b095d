// Package webhook serves Trellis' sidecar injector as a Kubernetes
// mutating admission webhook: the API server sends each pod it is about to
// create in a namespace labelled for the mesh, or annotated to join it, and
// the answer is a JSON patch adding what inject.Config.Pod adds. Whether
// to inject and what to add are inject's pure decisions; this package is
// the transport, and the name of the pod's workload.
package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "k8s.io/apimachinery/pkg/util/json"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
)

// MaxBodyBytes bounds an admission review. The API server limits an
// object to about 1.5 MiB of etcd storage, and a review carries the object
// once for a CREATE: anything much larger is not from the API server.
const MaxBodyBytes = 4 << 20

// Injector is the webhook's http.Handler, served at install.WebhookPath.
type Injector struct {
	// Config is what the injected sidecar needs to know about the mesh.
	Config inject.Config
	// Namespaces returns the labels of the namespace a pod is created in.
	// Back it with an informer's lister: it is called on every pod
	// creation the webhook sees. It is required.
	Namespaces func(ctx context.Context, name string) (map[string]string, error)
	// Log gets each decision at debug level and each refusal at info; nil
	// discards them.
	Log *slog.Logger
}

// ServeHTTP answers an AdmissionReview (admission.k8s.io/v1) for a pod's
// creation. A request that is not one is answered 400 (413 when too
// large), which the API server, failing closed, turns into a refusal
// naming this webhook.
func (i *Injector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := i.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "the injector takes admission reviews by POST", http.StatusMethodNotAllowed)
		return
	}
	review, pod, status, err := readReview(w, r)
	if err != nil {
		log.Info("bad admission request", "remote", r.RemoteAddr, "error", err)
		http.Error(w, err.Error(), status)
		return
	}
	resp := i.admit(r.Context(), log, review.Request, pod)
	resp.UID = review.Request.UID
	out, err := kjson.Marshal(&admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp})
	if err != nil {
		// Nothing in a response fails to marshal; an answer anyway.
		http.Error(w, "encoding the admission response: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
}

// readReview reads and checks a review of a pod's creation, and decodes
// the pod. On error it returns the HTTP status to answer with.
func readReview(w http.ResponseWriter, r *http.Request) (*admissionv1.AdmissionReview, *corev1.Pod, int, error) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("content type %q: the injector takes application/json admission reviews", r.Header.Get("Content-Type"))
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, nil, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes: not an admission review of a pod", MaxBodyBytes)
		}
		return nil, nil, http.StatusBadRequest, fmt.Errorf("reading the body: %w", err)
	}
	// Decoded as the API server decodes, with case-sensitive keys: a
	// "Metadata" the API server ignores must not be read as metadata here.
	// Unknown fields are kept quiet: a newer API server may send some.
	var review admissionv1.AdmissionReview
	if err := kjson.Unmarshal(body, &review); err != nil {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("body: not an AdmissionReview: %w", err)
	}
	if review.APIVersion != admissionv1.SchemeGroupVersion.String() || review.Kind != "AdmissionReview" {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("body is apiVersion %q kind %q: the injector takes admission.k8s.io/v1 AdmissionReview (admissionReviewVersions: [v1] in the webhook configuration)", review.APIVersion, review.Kind)
	}
	req := review.Request
	if req == nil || req.UID == "" {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("AdmissionReview without request.uid: not a review from the API server")
	}
	if req.Resource != (metav1.GroupVersionResource{Version: "v1", Resource: "pods"}) || req.SubResource != "" {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("request.resource %s (subresource %q): the injector takes pods only: its webhook's rules must name resources [pods] in apiGroups [\"\"]", gvr(req.Resource), req.SubResource)
	}
	if req.Operation != admissionv1.Create {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("request.operation %q: the injector takes pod creations only: its webhook's rules must name operations [CREATE]", req.Operation)
	}
	if len(req.Object.Raw) == 0 {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("request.object is empty: a pod's creation carries the pod")
	}
	var pod corev1.Pod
	if err := kjson.Unmarshal(req.Object.Raw, &pod); err != nil {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("request.object: not a pod: %w", err)
	}
	// The patch adds members to these two objects, which must be there.
	var shape struct {
		Metadata map[string]json.RawMessage `json:"metadata"`
		Spec     map[string]json.RawMessage `json:"spec"`
	}
	if err := kjson.Unmarshal(req.Object.Raw, &shape); err != nil || shape.Metadata == nil || shape.Spec == nil {
		return nil, nil, http.StatusBadRequest, fmt.Errorf("request.object: not a pod: it needs a metadata and a spec")
	}
	return &review, &pod, 0, nil
}

func gvr(r metav1.GroupVersionResource) string {
	if r.Group == "" {
		return r.Version + "/" + r.Resource
	}
	return r.Group + "/" + r.Version + "/" + r.Resource
}

// admit decides about one pod. It refuses a pod that should be in the
// mesh but cannot be injected: admitted as it is, it would run outside
// the mesh, reachable in plaintext by anyone and reaching nothing that
// requires mutual TLS.
func (i *Injector) admit(ctx context.Context, log *slog.Logger, req *admissionv1.AdmissionRequest, pod *corev1.Pod) *admissionv1.AdmissionResponse {
	name := pod.Name
	if name == "" {
		name = pod.GenerateName + "*"
	}
	log = log.With("namespace", req.Namespace, "pod", name, "uid", req.UID)
	if inject.Injected(&pod.Spec) {
		// A reinvocation after another webhook changed the pod, or a pod
		// injected offline by trellis inject.
		log.Debug("pod already injected")
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	var labels map[string]string
	var err error
	if i.Namespaces == nil {
		err = errors.New("Injector.Namespaces is not set")
	} else {
		labels, err = i.Namespaces(ctx, req.Namespace)
	}
	if err != nil {
		log.Warn("refused pod: namespace labels unknown", "error", err)
		return refuse(http.StatusServiceUnavailable, fmt.Sprintf("the Trellis injector cannot read the labels of namespace %s (%v): the pod is refused rather than started outside the mesh; its controller retries, or create it again", req.Namespace, err))
	}
	if !inject.Wanted(labels, &pod.ObjectMeta, &pod.Spec) {
		log.Debug("pod not injected: not in the mesh", "annotation", pod.Annotations[inject.Annotation], "namespaceLabel", labels[inject.NamespaceLabel], "hostNetwork", pod.Spec.HostNetwork)
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	workload := Workload(pod)
	log = log.With("workload", workload)
	injected := pod.DeepCopy()
	if err := i.Config.Pod(workload, &injected.ObjectMeta, &injected.Spec); err != nil {
		log.Info("refused pod: cannot inject", "error", err)
		return refuse(http.StatusUnprocessableEntity, fmt.Sprintf("the pod is meant for the Trellis mesh but cannot be injected: %v (or annotate the pod %s: disabled to keep it out of the mesh)", err, inject.Annotation))
	}
	patch, err := jsonPatch(req.Object.Raw, pod, injected)
	if err != nil {
		log.Warn("refused pod: cannot patch", "error", err)
		return refuse(http.StatusInternalServerError, fmt.Sprintf("the Trellis injector cannot patch the pod: %v (a bug in the injector: report it; annotate the pod %s: disabled to start it outside the mesh meanwhile)", err, inject.Annotation))
	}
	log.Debug("pod injected")
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: new(admissionv1.PatchTypeJSONPatch)}
}

func refuse(code int32, msg string) *admissionv1.AdmissionResponse {
	reason := metav1.StatusReasonInvalid
	switch code {
	case http.StatusServiceUnavailable:
		reason = metav1.StatusReasonServiceUnavailable
	case http.StatusInternalServerError:
		reason = metav1.StatusReasonInternalError
	}
	return &admissionv1.AdmissionResponse{Allowed: false, Result: &metav1.Status{
		Status: metav1.StatusFailure, Code: code, Reason: reason, Message: msg,
	}}
}
