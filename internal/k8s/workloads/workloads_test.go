package workloads

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/registry"
)

var (
	t0 = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	td = spiffeid.RequireTrustDomainFromString("cluster.local")
)

// pod is an injected pod of workload in shipping, created at t0+age.
func pod(t *testing.T, name, workload, sa, ip string, age int, labels map[string]string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shipping", Labels: labels, CreationTimestamp: metav1.NewTime(t0.Add(time.Duration(age) * time.Second))},
		Spec: corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{
			{Name: "http-api", ContainerPort: 8080}, {Name: "grpc", ContainerPort: 9000},
		}}}},
		Status: corev1.PodStatus{PodIP: ip, Phase: corev1.PodRunning},
	}
	if err := (inject.Config{ProxyImage: "proxy"}).Pod(workload, &p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDeclarations(t *testing.T) {
	stable := map[string]string{"app": "orders", "pod-template-hash": "7d9"}
	next := map[string]string{"app": "orders", "version": "v2", "pod-template-hash": "8ab"}
	a := pod(t, "orders-7d9-a", "orders", "orders", "10.0.0.5", 0, stable)
	a.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	b := pod(t, "orders-8ab-b", "orders", "orders", "10.0.0.6", 10, next)
	// The newest pod, but pending: no IP, so it speaks for nothing.
	pending := pod(t, "orders-9zz-c", "orders", "orders-v3", "", 20, map[string]string{"app": "debug"})
	oldSA := pod(t, "orders-6f1-d", "orders", "legacy", "10.0.0.7", -10, stable)
	done := pod(t, "report-x", "report", "report", "10.0.0.8", 0, nil)
	done.Status.Phase = corev1.PodSucceeded
	deleting := pod(t, "orders-7d9-e", "orders", "orders", "10.0.0.9", 0, stable)
	deleting.DeletionTimestamp = ptr.To(metav1.NewTime(t0))
	plain := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "legacy-client", Namespace: "shipping"}, Status: corev1.PodStatus{PodIP: "10.0.0.10"}}
	defaultSA := pod(t, "cli", "cli", "", "10.0.0.11", 0, map[string]string{"app": "cli"})

	services := []*corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "orders", Namespace: "shipping"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "orders"}, ClusterIP: "198.19.64.10",
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)},
				{Name: "rpc", Port: 9000, TargetPort: intstr.FromString("grpc"), AppProtocol: ptr.To("grpc")},
				{Name: "missing", Port: 7000, TargetPort: intstr.FromString("nope")},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "orders-headless", Namespace: "shipping"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "orders"}, ClusterIP: "None", Ports: []corev1.ServicePort{{Name: "tcp-x", Port: 5000}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "external", Namespace: "shipping"}, Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "manual", Namespace: "shipping"}, Spec: corev1.ServiceSpec{ClusterIP: "198.19.64.11"}},
		// Selects no meshed pod (kube-dns, say): not the mesh's.
		{ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: "kube-system"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"k8s-app": "kube-dns"}, ClusterIP: "198.19.64.2", Ports: []corev1.ServicePort{{Name: "dns-tcp", Port: 53}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "legacy", Namespace: "shipping"}, Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "legacy"}, ClusterIP: "198.19.64.12", Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
	}
	got := Declarations(td, []*corev1.Pod{a, b, pending, oldSA, done, deleting, plain, defaultSA}, services, nil)
	ports := []registry.WorkloadPort{{Port: 8080, Protocol: "http"}, {Port: 9000, Protocol: "grpc"}}
	want := registry.Declarations{
		Workloads: []registry.Workload{
			{Namespace: "shipping", Name: "cli", ServiceAccount: "default", Labels: map[string]string{"app": "cli"}, Ports: ports,
				Instances: map[string]registry.DeclaredInstance{"cli": {IP: netip.MustParseAddr("10.0.0.11"), ServiceAccount: "default", Identity: "spiffe://cluster.local/ns/shipping/sa/default"}}},
			// The newest running pod's labels and service account; every
			// running pod, each with its own service account (a rollout
			// that changes it serves throughout); not the pending, deleted
			// or finished ones.
			{Namespace: "shipping", Name: "orders", ServiceAccount: "orders", Labels: map[string]string{"app": "orders", "version": "v2"}, Ports: ports,
				Instances: map[string]registry.DeclaredInstance{
					"orders-7d9-a": {IP: netip.MustParseAddr("10.0.0.5"), ServiceAccount: "orders", Ready: true, Identity: "spiffe://cluster.local/ns/shipping/sa/orders"},
					"orders-8ab-b": {IP: netip.MustParseAddr("10.0.0.6"), ServiceAccount: "orders", Identity: "spiffe://cluster.local/ns/shipping/sa/orders"},
					"orders-6f1-d": {IP: netip.MustParseAddr("10.0.0.7"), ServiceAccount: "legacy", Identity: "spiffe://cluster.local/ns/shipping/sa/legacy"},
				}},
		},
		Services: []registry.Service{
			{Namespace: "shipping", Name: "orders", Selector: map[string]string{"app": "orders"}, Address: "198.19.64.10", Ports: []registry.ServicePort{
				{Name: "http", Port: 80, TargetPort: 8080, Protocol: "http"},
				{Name: "rpc", Port: 9000, TargetPort: 9000, Protocol: "grpc"},
			}},
			{Namespace: "shipping", Name: "orders-headless", Selector: map[string]string{"app": "orders"}, Ports: []registry.ServicePort{
				{Name: "tcp-x", Port: 5000, TargetPort: 5000, Protocol: "tcp"},
			}},
		},
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("Declarations (-want +got):\n%s", diff)
	}
}

// A pod whose proxy configuration annotation was edited into nonsense
// cannot join; the others are not held back.
func TestInvalidProxyConfigIsLeftOut(t *testing.T) {
	bad := pod(t, "x", "x", "x", "10.0.0.1", 0, nil)
	bad.Annotations[inject.ProxyConfigAnnotation] = "kind: Nonsense\n"
	good := pod(t, "y", "y", "y", "10.0.0.2", 0, nil)
	got := Declarations(td, []*corev1.Pod{bad, good}, nil, nil)
	if len(got.Workloads) != 1 || got.Workloads[0].Name != "y" {
		t.Errorf("workloads %+v, want y alone", got.Workloads)
	}
}
