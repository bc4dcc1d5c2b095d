package k8snode

import (
	corev1 "k8s.io/api/core/v1"
)

// The pure part of a pod's status: its phase and conditions, decided from
// a snapshot of its containers as a kubelet decides them.

// containerSnap is what the node knows of one container.
type containerSnap struct {
	Name, Image string
	// Sidecar: an init container with restartPolicy Always.
	Sidecar     bool
	State, Last corev1.ContainerState
	Restarts    int32
	// Started: running, and its startup probe (if any) passed.
	Started bool
	Ready   bool
	ID      string
}

// podSnap is what the node knows of a pod.
type podSnap struct {
	RestartPolicy corev1.RestartPolicy
	// SandboxReady: the network namespace exists.
	SandboxReady bool
	// Initialized: every init container completed, every sidecar started.
	Initialized bool
	// Failed says why the pod failed for good (an init container failed
	// under restartPolicy Never); empty otherwise.
	Failed      string
	Inits, Apps []containerSnap
}

// podPhase follows the kubelet's getPhase, simplified to what k8snode
// runs.
func podPhase(s podSnap) corev1.PodPhase {
	if s.Failed != "" {
		return corev1.PodFailed
	}
	if !s.Initialized {
		return corev1.PodPending
	}
	running, stopped, succeeded, waiting := 0, 0, 0, 0
	for _, c := range s.Apps {
		switch {
		case c.State.Running != nil:
			running++
		case c.State.Terminated != nil:
			stopped++
			if c.State.Terminated.ExitCode == 0 {
				succeeded++
			}
		case c.Last.Terminated != nil:
			stopped++ // waiting to restart
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	}
	// Every container has stopped.
	switch s.RestartPolicy {
	case corev1.RestartPolicyNever:
		if succeeded == stopped {
			return corev1.PodSucceeded
		}
		return corev1.PodFailed
	case corev1.RestartPolicyOnFailure:
		if succeeded == stopped {
			return corev1.PodSucceeded
		}
	}
	return corev1.PodRunning // restarting
}

// podConditions are the pod's condition statuses: Ready when every
// application container and every sidecar is ready.
func podConditions(s podSnap) map[corev1.PodConditionType]bool {
	ready := s.Initialized && s.Failed == ""
	for _, c := range s.Apps {
		ready = ready && c.Ready
	}
	for _, c := range s.Inits {
		if c.Sidecar {
			ready = ready && c.Ready
		}
	}
	return map[corev1.PodConditionType]bool{
		corev1.PodScheduled:              true,
		corev1.PodReadyToStartContainers: s.SandboxReady,
		corev1.PodInitialized:            s.Initialized,
		corev1.ContainersReady:           ready,
		corev1.PodReady:                  ready,
	}
}

// conditionOrder is the order a kubelet lists the conditions in.
var conditionOrder = []corev1.PodConditionType{
	corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.PodReady, corev1.ContainersReady, corev1.PodScheduled,
}

func containerStatus(c containerSnap) corev1.ContainerStatus {
	started := c.Started
	return corev1.ContainerStatus{
		Name:                 c.Name,
		Image:                c.Image,
		ImageID:              "k8snode://" + c.Image,
		ContainerID:          c.ID,
		State:                c.State,
		LastTerminationState: c.Last,
		Ready:                c.Ready,
		RestartCount:         c.Restarts,
		Started:              &started,
	}
}
