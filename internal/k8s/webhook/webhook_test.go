package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	apitypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	kjson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
)

var testConfig = inject.Config{ProxyImage: "registry.example/trellis-proxy:test"}

// namespaces stands in for the namespace lister: shipping is meshed,
// legacy is not.
var namespaces = map[string]map[string]string{
	"shipping": {inject.NamespaceLabel: "enabled", "kubernetes.io/metadata.name": "shipping"},
	"legacy":   {"kubernetes.io/metadata.name": "legacy"},
}

func newInjector(t testing.TB) *Injector {
	return &Injector{
		Config: testConfig,
		Namespaces: func(_ context.Context, name string) (map[string]string, error) {
			labels, ok := namespaces[name]
			if !ok {
				return nil, fmt.Errorf("namespace %q not found", name)
			}
			return labels, nil
		},
		Log: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

// deploymentPod is a pod as the ReplicaSet controller of Deployment
// orders-api creates it: no name yet, annotations, an init container and
// a volume of its own.
func deploymentPod() *corev1.Pod {
	return &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "orders-api-5f7b9c-", Namespace: "shipping",
			Labels:          map[string]string{"app": "orders-api", "pod-template-hash": "5f7b9c"},
			Annotations:     map[string]string{"team": "orders"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "orders-api-5f7b9c", UID: "rs-uid", Controller: ptr.To(true)}},
		},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{Name: "migrate", Image: "registry.example/orders-migrate:1"}},
			Containers: []corev1.Container{{Name: "api", Image: "registry.example/orders-api:1",
				Ports:        []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}}},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	}
}

// barePod has none of the fields injection sets.
func barePod(namespace string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "debug", Namespace: namespace, Annotations: annotations},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "sh", Image: "busybox"}}},
	}
}

func marshal(t testing.TB, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// reviewOf is the API server's review of a pod's creation.
func reviewOf(t testing.TB, uid, namespace string, object []byte) []byte {
	t.Helper()
	return marshal(t, &admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       apitypes.UID("uid-" + uid),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: namespace,
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: object},
		},
	})
}

func post(t testing.TB, h http.Handler, contentType string, body []byte) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// response decodes a 200 answer and checks it answers request uid.
func response(t testing.TB, rec *httptest.ResponseRecorder, uid string) *admissionv1.AdmissionResponse {
	t.Helper()
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d, want 200: %s", rec.Code, rec.Body)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var review admissionv1.AdmissionReview
	if err := kjson.Unmarshal(rec.Body.Bytes(), &review); err != nil {
		t.Fatalf("answer is not an AdmissionReview: %v\n%s", err, rec.Body)
	}
	if review.APIVersion != "admission.k8s.io/v1" || review.Kind != "AdmissionReview" || review.Response == nil {
		t.Fatalf("answer %s: want an admission.k8s.io/v1 AdmissionReview with a response", rec.Body)
	}
	if got := string(review.Response.UID); got != uid {
		t.Errorf("response.uid %q, want the request's %q", got, uid)
	}
	return review.Response
}

// applyPatch applies add and replace operations on members of objects,
// all the injector writes (RFC 6902 §4.1, §4.3).
func applyPatch(t testing.TB, doc, patch []byte) []byte {
	t.Helper()
	var ops []struct {
		Op    string          `json:"op"`
		Path  string          `json:"path"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(patch, &ops); err != nil {
		t.Fatalf("patch %s: %v", patch, err)
	}
	var root any
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	if err := dec.Decode(&root); err != nil {
		t.Fatal(err)
	}
	for _, op := range ops {
		parts := strings.Split(op.Path, "/")
		if len(parts) < 2 || parts[0] != "" {
			t.Fatalf("op %s: path %q is not a JSON pointer", op.Op, op.Path)
		}
		parent := root
		for _, p := range parts[1 : len(parts)-1] {
			if l, ok := parent.([]any); ok {
				i, err := strconv.Atoi(p)
				if err != nil || i < 0 || i >= len(l) {
					t.Fatalf("op %s %s: %s is not an index of the list", op.Op, op.Path, p)
				}
				parent = l[i]
				continue
			}
			m, ok := parent.(map[string]any)
			if !ok || m[p] == nil {
				t.Fatalf("op %s %s: %s is not an object in the document", op.Op, op.Path, p)
			}
			parent = m[p]
		}
		m, ok := parent.(map[string]any)
		if !ok {
			t.Fatalf("op %s %s: the parent is not an object", op.Op, op.Path)
		}
		key := parts[len(parts)-1]
		var value any
		vdec := json.NewDecoder(bytes.NewReader(op.Value))
		vdec.UseNumber()
		if err := vdec.Decode(&value); err != nil {
			t.Fatalf("op %s %s: value: %v", op.Op, op.Path, err)
		}
		switch op.Op {
		case "add":
		case "replace":
			if _, ok := m[key]; !ok {
				t.Fatalf("replace %s: no such member (RFC 6902 §4.3 requires one)", op.Path)
			}
		default:
			t.Fatalf("op %q: the injector writes add and replace only", op.Op)
		}
		m[key] = value
	}
	return marshal(t, root)
}

// wantInjected is the pod inject.Config.Pod makes of pod.
func wantInjected(t *testing.T, pod *corev1.Pod, workload string) *corev1.Pod {
	t.Helper()
	want := pod.DeepCopy()
	if err := testConfig.Pod(workload, &want.ObjectMeta, &want.Spec); err != nil {
		t.Fatal(err)
	}
	return want
}

// patched applies a response's patch to the pod the review carried.
func patched(t *testing.T, resp *admissionv1.AdmissionResponse, object []byte) *corev1.Pod {
	t.Helper()
	if !resp.Allowed {
		t.Fatalf("refused (%+v), want allowed", resp.Result)
	}
	if resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
		t.Fatalf("patchType %v, want JSONPatch", resp.PatchType)
	}
	var got corev1.Pod
	if err := kjson.Unmarshal(applyPatch(t, object, resp.Patch), &got); err != nil {
		t.Fatal(err)
	}
	return &got
}

func ops(t *testing.T, patch []byte) map[string]string {
	t.Helper()
	var list []operation
	if err := json.Unmarshal(patch, &list); err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, op := range list {
		m[op.Path] = op.Op
	}
	return m
}

func TestInject(t *testing.T) {
	for _, tc := range []struct {
		name      string
		pod       *corev1.Pod
		workload  string
		wantOps   map[string]string
		namespace string
	}{
		{
			name: "a Deployment's pod in a meshed namespace", pod: deploymentPod(), workload: "orders-api", namespace: "shipping",
			wantOps: map[string]string{"/metadata/annotations": "replace", "/spec/initContainers": "replace", "/spec/volumes": "replace"},
		},
		{
			name: "a pod that opts in, in a namespace that is not meshed", pod: barePod("legacy", map[string]string{inject.Annotation: "enabled"}), workload: "debug", namespace: "legacy",
			wantOps: map[string]string{"/metadata/annotations": "replace", "/spec/initContainers": "add", "/spec/volumes": "add"},
		},
		{
			name: "a pod without annotations, init containers or volumes", pod: barePod("shipping", nil), workload: "debug", namespace: "shipping",
			wantOps: map[string]string{"/metadata/annotations": "add", "/spec/initContainers": "add", "/spec/volumes": "add"},
		},
		{
			name: "a pod whose HTTP probes move to the proxy", pod: probedPod(), workload: "debug", namespace: "shipping",
			wantOps: map[string]string{"/metadata/annotations": "add", "/spec/initContainers": "add", "/spec/volumes": "add",
				"/spec/containers/0/readinessProbe": "replace", "/spec/containers/0/livenessProbe": "replace"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			object := marshal(t, tc.pod)
			resp := response(t, post(t, newInjector(t), "application/json", reviewOf(t, "1", tc.namespace, object)), "uid-1")
			got := patched(t, resp, object)
			want := wantInjected(t, tc.pod, tc.workload)
			if diff := cmp.Diff(string(marshal(t, want)), string(marshal(t, got))); diff != "" {
				t.Errorf("patched pod differs from inject.Config.Pod's (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantOps, ops(t, resp.Patch)); diff != "" {
				t.Errorf("patch operations (-want +got):\n%s", diff)
			}
		})
	}
}

// probedPod has HTTP probes (moved to the proxy) and a TCP one (left).
func probedPod() *corev1.Pod {
	p := barePod("shipping", nil)
	c := &p.Spec.Containers[0]
	c.ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}}}
	c.LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/live", Port: intstr.FromInt32(8080)}}}
	c.StartupProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}}
	return p
}

// TestInjectKeepsUnknownFields: the user's own init containers and volumes
// are patched back as the API server sent them, fields this build's API
// types do not know included (a newer API server's).
func TestInjectKeepsUnknownFields(t *testing.T) {
	object := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"orders-","namespace":"shipping"},
		"spec":{"containers":[{"name":"api","image":"orders"}],
		"initContainers":[{"name":"migrate","image":"migrate","futureField":{"x":1}}],
		"volumes":[{"name":"data","emptyDir":{},"futureField":true}]}}`)
	resp := response(t, post(t, newInjector(t), "application/json", reviewOf(t, "2", "shipping", object)), "uid-2")
	var doc struct {
		Spec struct {
			InitContainers []map[string]any `json:"initContainers"`
			Volumes        []map[string]any `json:"volumes"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(applyPatch(t, object, resp.Patch), &doc); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range doc.Spec.InitContainers {
		names = append(names, fmt.Sprint(c["name"]))
		if c["name"] == "migrate" && c["futureField"] == nil {
			t.Errorf("init container migrate lost futureField: %v", c)
		}
	}
	if diff := cmp.Diff([]string{inject.InitContainer, inject.ProxyContainer, "migrate"}, names); diff != "" {
		t.Errorf("init containers (-want +got):\n%s", diff)
	}
	if len(doc.Spec.Volumes) != 6 || doc.Spec.Volumes[0]["futureField"] != true {
		t.Errorf("volumes %v: want data (with futureField) and the sidecar's five", doc.Spec.Volumes)
	}
}

func TestSkip(t *testing.T) {
	injected := wantInjected(t, barePod("shipping", nil), "debug")
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
	}{
		{"opted out in a meshed namespace", barePod("shipping", map[string]string{inject.Annotation: "disabled"})},
		{"opted out with false", barePod("shipping", map[string]string{inject.Annotation: "false"})},
		{"namespace not meshed", barePod("legacy", nil)},
		{"host network", func() *corev1.Pod { p := barePod("shipping", nil); p.Spec.HostNetwork = true; return p }()},
		{"already injected", injected},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := response(t, post(t, newInjector(t), "application/json", reviewOf(t, "3", tc.pod.Namespace, marshal(t, tc.pod))), "uid-3")
			if !resp.Allowed || resp.Patch != nil || resp.PatchType != nil || resp.Result != nil {
				t.Errorf("response %+v, want allowed without patch", resp)
			}
		})
	}
	// An injected pod is let through without asking for its namespace,
	// the way a reinvocation finds it.
	inj := newInjector(t)
	inj.Namespaces = func(context.Context, string) (map[string]string, error) {
		t.Error("namespace labels read for an injected pod")
		return nil, nil
	}
	response(t, post(t, inj, "application/json", reviewOf(t, "4", "shipping", marshal(t, injected))), "uid-4")
}

func TestRefuse(t *testing.T) {
	named := barePod("shipping", nil)
	named.Spec.Containers = append(named.Spec.Containers, corev1.Container{Name: inject.ProxyContainer, Image: "someone-elses-proxy"})
	for _, tc := range []struct {
		name      string
		namespace string
		pod       *corev1.Pod
		code      int32
		want      []string
	}{
		{"a container named trellis-proxy", "shipping", named, 422,
			[]string{"spec.containers", "trellis-proxy", "rename it", inject.Annotation + ": disabled"}},
		{"bad exclude-inbound-ports", "shipping", barePod("shipping", map[string]string{inject.ExcludeInboundPorts: "3306,mysql"}), 422,
			[]string{"annotation " + inject.ExcludeInboundPorts, `"mysql" is not a port number`}},
		{"bad exclude-outbound-ports in a pod that opts in", "legacy", barePod("legacy", map[string]string{inject.Annotation: "enabled", inject.ExcludeOutboundPorts: "70000"}), 422,
			[]string{"annotation " + inject.ExcludeOutboundPorts, `"70000" is not a port number`}},
		{"the application on the sidecar's port", "shipping", func() *corev1.Pod {
			p := barePod("shipping", nil)
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: inject.InboundPort}}
			return p
		}(), 422, []string{"spec.containers[0].ports[0]", "move the application to another port"}},
		{"namespace labels unknown", "gone", barePod("gone", nil), 503,
			[]string{"namespace gone", `namespace "gone" not found`, "retries"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := response(t, post(t, newInjector(t), "application/json", reviewOf(t, "5", tc.namespace, marshal(t, tc.pod))), "uid-5")
			if resp.Allowed || resp.Patch != nil || resp.Result == nil {
				t.Fatalf("response %+v, want refused with a status", resp)
			}
			if resp.Result.Code != tc.code || resp.Result.Status != metav1.StatusFailure {
				t.Errorf("status code %d %q, want %d Failure", resp.Result.Code, resp.Result.Status, tc.code)
			}
			for _, w := range tc.want {
				if !strings.Contains(resp.Result.Message, w) {
					t.Errorf("message %q does not say %q", resp.Result.Message, w)
				}
			}
		})
	}
}

func TestBadRequest(t *testing.T) {
	pod := marshal(t, barePod("shipping", nil))
	review := func(edit func(*admissionv1.AdmissionReview)) []byte {
		var r admissionv1.AdmissionReview
		if err := json.Unmarshal(reviewOf(t, "6", "shipping", pod), &r); err != nil {
			t.Fatal(err)
		}
		edit(&r)
		return marshal(t, &r)
	}
	for _, tc := range []struct {
		name        string
		contentType string
		body        []byte
		code        int
		want        string
	}{
		{"wrong content type", "text/plain", reviewOf(t, "6", "shipping", pod), 400, "application/json"},
		{"no content type", "", reviewOf(t, "6", "shipping", pod), 400, "application/json"},
		{"not JSON", "application/json", []byte("hello"), 400, "not an AdmissionReview"},
		{"trailing garbage", "application/json", append(reviewOf(t, "6", "shipping", pod), "{}"...), 400, "not an AdmissionReview"},
		{"empty", "application/json", nil, 400, "not an AdmissionReview"},
		{"another kind", "application/json", []byte(`{"apiVersion":"v1","kind":"Pod"}`), 400, "admission.k8s.io/v1 AdmissionReview"},
		{"v1beta1", "application/json", review(func(r *admissionv1.AdmissionReview) { r.APIVersion = "admission.k8s.io/v1beta1" }), 400, "admissionReviewVersions: [v1]"},
		{"no request", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request = nil }), 400, "request.uid"},
		{"no uid", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.UID = "" }), 400, "request.uid"},
		{"deployments", "application/json", review(func(r *admissionv1.AdmissionReview) {
			r.Request.Resource = metav1.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}
		}), 400, "apps/v1/deployments"},
		{"a pod's subresource", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.SubResource = "status" }), 400, `subresource "status"`},
		{"an update", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.Operation = admissionv1.Update }), 400, "operations [CREATE]"},
		{"no object", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.Object.Raw = nil }), 400, "request.object is empty"},
		{"object not a pod", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.Object.Raw = []byte(`{"spec":5}`) }), 400, "request.object: not a pod"},
		{"object without spec", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.Object.Raw = []byte(`{"metadata":{"name":"x"}}`) }), 400, "needs a metadata and a spec"},
		{"object without metadata", "application/json", review(func(r *admissionv1.AdmissionReview) { r.Request.Object.Raw = []byte(`{"spec":{}}`) }), 400, "needs a metadata and a spec"},
		{"too large", "application/json", bytes.Repeat([]byte(" "), MaxBodyBytes+1), 413, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := post(t, newInjector(t), tc.contentType, tc.body)
			if rec.Code != tc.code || !strings.Contains(rec.Body.String(), tc.want) {
				t.Errorf("answer %d %q, want %d saying %q", rec.Code, rec.Body, tc.code, tc.want)
			}
		})
	}
	// charset parameters are fine.
	response(t, post(t, newInjector(t), "application/json; charset=utf-8", reviewOf(t, "7", "shipping", pod)), "uid-7")

	rec := httptest.NewRecorder()
	newInjector(t).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/inject", nil))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != http.MethodPost {
		t.Errorf("GET: %d (Allow %q), want 405 allowing POST", rec.Code, rec.Header().Get("Allow"))
	}
}

// TestNoNamespaces: an Injector without its Namespaces function refuses
// rather than guessing pods out of the mesh.
func TestNoNamespaces(t *testing.T) {
	inj := newInjector(t)
	inj.Namespaces = nil
	inj.Log = nil
	resp := response(t, post(t, inj, "application/json", reviewOf(t, "8", "shipping", marshal(t, barePod("shipping", nil)))), "uid-8")
	if resp.Allowed || resp.Result == nil || !strings.Contains(resp.Result.Message, "Namespaces is not set") {
		t.Errorf("response %+v, want refused", resp)
	}
}

// TestPatchOnlyInjectedFields: a change outside the three patched fields
// is an error, not a pod admitted half injected.
func TestPatchOnlyInjectedFields(t *testing.T) {
	before := barePod("shipping", nil)
	after := wantInjected(t, before, "debug")
	after.Spec.Containers[0].Image = "elsewhere"
	if _, err := jsonPatch(marshal(t, before), before, after); err == nil || !strings.Contains(err.Error(), "a field other than") {
		t.Errorf("jsonPatch = %v, want an error about a field other than the patched ones", err)
	}
}
