package webhook

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func TestWorkload(t *testing.T) {
	controller := func(apiVersion, kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{APIVersion: apiVersion, Kind: kind, Name: name, UID: "u", Controller: ptr.To(true)}}
	}
	hash := map[string]string{"pod-template-hash": "7d9f8c6b5"}
	for _, tc := range []struct {
		name string
		meta metav1.ObjectMeta
		want string
	}{
		{"deployment's pod at admission",
			metav1.ObjectMeta{GenerateName: "orders-api-7d9f8c6b5-", Labels: hash, OwnerReferences: controller("apps/v1", "ReplicaSet", "orders-api-7d9f8c6b5")},
			"orders-api"},
		{"deployment's pod once named",
			metav1.ObjectMeta{Name: "orders-api-7d9f8c6b5-x2x4q", Labels: hash, OwnerReferences: controller("apps/v1", "ReplicaSet", "orders-api-7d9f8c6b5")},
			"orders-api"},
		{"bare replicaset: no pod-template-hash",
			metav1.ObjectMeta{GenerateName: "cache-", OwnerReferences: controller("apps/v1", "ReplicaSet", "cache")},
			"cache"},
		{"replicaset whose name does not end in the hash",
			metav1.ObjectMeta{GenerateName: "cache-", Labels: hash, OwnerReferences: controller("apps/v1", "ReplicaSet", "cache")},
			"cache"},
		{"replicaset named only the hash",
			metav1.ObjectMeta{GenerateName: "x-", Labels: hash, OwnerReferences: controller("apps/v1", "ReplicaSet", "-7d9f8c6b5")},
			"-7d9f8c6b5"},
		{"another group's ReplicaSet keeps its name",
			metav1.ObjectMeta{GenerateName: "r-", Labels: hash, OwnerReferences: controller("example.com/v1", "ReplicaSet", "r-7d9f8c6b5")},
			"r-7d9f8c6b5"},
		{"statefulset",
			metav1.ObjectMeta{GenerateName: "ledger-", OwnerReferences: controller("apps/v1", "StatefulSet", "ledger")},
			"ledger"},
		{"statefulset's pod with a name (StatefulSets name their pods)",
			metav1.ObjectMeta{Name: "ledger-0", OwnerReferences: controller("apps/v1", "StatefulSet", "ledger")},
			"ledger"},
		{"daemonset",
			metav1.ObjectMeta{GenerateName: "node-agent-", OwnerReferences: controller("apps/v1", "DaemonSet", "node-agent")},
			"node-agent"},
		{"job",
			metav1.ObjectMeta{GenerateName: "migrate-2-", OwnerReferences: controller("batch/v1", "Job", "migrate-2")},
			"migrate-2"},
		{"cronjob's job: the job's name, the run number kept",
			metav1.ObjectMeta{GenerateName: "report-29153400-", OwnerReferences: controller("batch/v1", "Job", "report-29153400")},
			"report-29153400"},
		{"an operator's own kind",
			metav1.ObjectMeta{GenerateName: "pg-", OwnerReferences: controller("postgres.example.com/v1", "Cluster", "pg")},
			"pg"},
		{"owners but no controller: the pod itself",
			metav1.ObjectMeta{Name: "debug", OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "ConfigMap", Name: "cm", UID: "u"}}},
			"debug"},
		{"bare pod", metav1.ObjectMeta{Name: "debug"}, "debug"},
		{"bare pod with generateName only", metav1.ObjectMeta{GenerateName: "scratch-"}, "scratch"},
		{"generateName without a dash", metav1.ObjectMeta{GenerateName: "scratch"}, "scratch"},
		{"name wins over generateName", metav1.ObjectMeta{Name: "a", GenerateName: "b-"}, "a"},
		{"nothing to go by", metav1.ObjectMeta{}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Workload(&corev1.Pod{ObjectMeta: tc.meta}); got != tc.want {
				t.Errorf("Workload = %q, want %q", got, tc.want)
			}
		})
	}
}
