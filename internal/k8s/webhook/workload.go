package webhook

import (
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Workload returns the Trellis workload name of a pod as the API server
// shows it at admission, from the pod alone: an admission webhook that
// asked the API server for the pod's owners would make every pod creation
// wait on more calls, and fail when they fail.
//
//   - A pod of a Deployment is owned by a ReplicaSet named
//     <deployment>-<pod-template-hash>, the hash also being the pod's
//     pod-template-hash label: the workload is the Deployment.
//   - A pod of any other controller (StatefulSet, DaemonSet, Job, a bare
//     ReplicaSet, ReplicationController, an operator's own kind) is that
//     controller's.
//   - A pod of a CronJob is owned by a Job named <cronjob>-<number>, whose
//     own owner the pod does not show: the workload is the Job, so each
//     run of a CronJob is a workload of its own. Cutting a numeric suffix
//     instead would misname a Job called "migrate-2".
//   - A pod without a controller is its own workload. A controller's pod
//     has no name yet at admission, only a generateName ("orders-"); a
//     pod that has neither gets "" (which injection refuses).
func Workload(pod *corev1.Pod) string {
	if owner := metav1.GetControllerOfNoCopy(pod); owner != nil && owner.Name != "" {
		if owner.Kind == "ReplicaSet" && strings.HasPrefix(owner.APIVersion, "apps/") {
			if hash := pod.Labels[appsv1.DefaultDeploymentUniqueLabelKey]; hash != "" {
				if deployment, ok := strings.CutSuffix(owner.Name, "-"+hash); ok && deployment != "" {
					return deployment
				}
			}
		}
		return owner.Name
	}
	if pod.Name != "" {
		return pod.Name
	}
	return strings.TrimSuffix(pod.GenerateName, "-")
}
