// Package clustercheck judges the health of Trellis in a Kubernetes
// cluster for trellis check: the CRDs installed, the control plane ready,
// the injector's webhook configured, every injected pod's proxy ready, no
// pod of a meshed namespace left outside the mesh, and the trust bundle's
// roots not about to expire. Gather reads the cluster; Evaluate, pure and
// table-tested, judges what it read.
package clustercheck

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/k8s/resources"
	"github.com/trellis-mesh/trellis/internal/meshcheck"
)

// Facts are what Gather read.
type Facts struct {
	// CRDs maps each CRD's name to whether it is Established; absent:
	// not installed.
	CRDs map[string]bool
	// ControlPlane is the control plane's Deployment, nil when the
	// cluster runs none (a control plane outside the cluster).
	ControlPlane *DeploymentFacts
	// Webhook is the injector's configuration, nil when absent.
	Webhook *admissionv1.MutatingWebhookConfiguration
	// WebhookEndpoints counts the ready endpoints of the webhook's
	// Service.
	WebhookEndpoints int
	// Pods are every pod of the cluster but kube-system's.
	Pods []corev1.Pod
	// MeshedNamespaces are the namespaces labelled for injection.
	MeshedNamespaces []string
	// Bundle is the trust bundle published in trellis-system, "" if none.
	Bundle string
}

// DeploymentFacts is a Deployment's readiness.
type DeploymentFacts struct {
	Desired, Available int32
}

// Gather reads the facts from the cluster.
func Gather(ctx context.Context, client kubernetes.Interface, dyn dynamic.Interface) (Facts, error) {
	f := Facts{CRDs: map[string]bool{}}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, k := range resources.Kinds {
		name := k.GVR.Resource + "." + k.GVR.Group
		u, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return f, fmt.Errorf("reading CRD %s: %w", name, err)
		}
		f.CRDs[name] = established(u)
	}
	d, err := client.AppsV1().Deployments(install.Namespace).Get(ctx, install.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return f, fmt.Errorf("reading the control plane's Deployment: %w", err)
	default:
		desired := int32(1)
		if d.Spec.Replicas != nil {
			desired = *d.Spec.Replicas
		}
		f.ControlPlane = &DeploymentFacts{Desired: desired, Available: d.Status.AvailableReplicas}
	}
	wh, err := client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, install.WebhookName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return f, fmt.Errorf("reading the webhook configuration: %w", err)
	default:
		f.Webhook = wh
		for _, w := range wh.Webhooks {
			if s := w.ClientConfig.Service; s != nil {
				eps, err := client.DiscoveryV1().EndpointSlices(s.Namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + s.Name})
				if err != nil {
					return f, fmt.Errorf("reading the webhook's endpoints: %w", err)
				}
				f.WebhookEndpoints = readyEndpoints(eps.Items)
				break
			}
		}
	}
	nss, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{LabelSelector: inject.NamespaceLabel + "=enabled"})
	if err != nil {
		return f, fmt.Errorf("listing namespaces: %w", err)
	}
	for _, ns := range nss.Items {
		f.MeshedNamespaces = append(f.MeshedNamespaces, ns.Name)
	}
	pods, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return f, fmt.Errorf("listing pods: %w", err)
	}
	for _, p := range pods.Items {
		if p.Namespace != "kube-system" {
			f.Pods = append(f.Pods, p)
		}
	}
	cm, err := client.CoreV1().ConfigMaps(install.Namespace).Get(ctx, inject.CAConfigMap, metav1.GetOptions{})
	if err == nil {
		f.Bundle = cm.Data["root-cert.pem"]
	} else if !apierrors.IsNotFound(err) {
		return f, fmt.Errorf("reading the trust bundle: %w", err)
	}
	return f, nil
}

func established(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}

func readyEndpoints(slices []discoveryv1.EndpointSlice) int {
	n := 0
	for _, s := range slices {
		for _, e := range s.Endpoints {
			if e.Conditions.Ready == nil || *e.Conditions.Ready {
				n++
			}
		}
	}
	return n
}

// startupGrace is how long a pod may take to become ready before a check
// counts it as failing rather than starting.
const startupGrace = 2 * time.Minute

// Evaluate judges the facts at now.
func Evaluate(f Facts, now time.Time) []meshcheck.Finding {
	var out []meshcheck.Finding
	add := func(check string, level meshcheck.Level, format string, args ...any) {
		out = append(out, meshcheck.Finding{Check: check, Level: level, Message: fmt.Sprintf(format, args...)})
	}

	var missing, pending []string
	for _, k := range resources.Kinds {
		name := k.GVR.Resource + "." + k.GVR.Group
		est, ok := f.CRDs[name]
		switch {
		case !ok:
			missing = append(missing, name)
		case !est:
			pending = append(pending, name)
		}
	}
	switch {
	case len(missing) > 0:
		add("CRDs", meshcheck.Fail, "not installed: %s; run trellis install | kubectl apply -f -", strings.Join(missing, ", "))
	case len(pending) > 0:
		add("CRDs", meshcheck.Warn, "not established yet: %s", strings.Join(pending, ", "))
	default:
		add("CRDs", meshcheck.OK, "%d installed and established", len(resources.Kinds))
	}

	switch cp := f.ControlPlane; {
	case cp == nil:
		add("control plane", meshcheck.Warn, "no Deployment %s/%s in the cluster (a control plane outside it?)", install.Namespace, install.Name)
	case cp.Available < 1:
		add("control plane", meshcheck.Fail, "Deployment %s/%s has no available replica; see kubectl -n %s describe deployment %s", install.Namespace, install.Name, install.Namespace, install.Name)
	default:
		add("control plane", meshcheck.OK, "%d of %d replicas available", cp.Available, cp.Desired)
	}

	switch wh := f.Webhook; {
	case wh == nil:
		add("injector", meshcheck.Fail, "no webhook configuration %s: pods are not injected; run trellis install | kubectl apply -f -", install.WebhookName)
	case slices.ContainsFunc(wh.Webhooks, func(w admissionv1.MutatingWebhook) bool { return len(w.ClientConfig.CABundle) == 0 }):
		add("injector", meshcheck.Fail, "the webhook configuration has no CA bundle yet: the control plane fills it in when it starts; is it running?")
	case slices.ContainsFunc(wh.Webhooks, func(w admissionv1.MutatingWebhook) bool { return w.ClientConfig.Service != nil }) && f.WebhookEndpoints == 0:
		add("injector", meshcheck.Fail, "the webhook's Service has no ready endpoint: pod creation in meshed namespaces fails while it has none")
	default:
		add("injector", meshcheck.OK, "webhook configured")
	}

	var injected, ready int
	var notReady, outside []string
	for i := range f.Pods {
		p := &f.Pods[i]
		if p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		ref := p.Namespace + "/" + p.Name
		if inject.Injected(&p.Spec) {
			injected++
			if proxyReady(p) {
				ready++
			} else if now.Sub(p.CreationTimestamp.Time) > startupGrace {
				notReady = append(notReady, ref)
			}
			continue
		}
		if slices.Contains(f.MeshedNamespaces, p.Namespace) && p.Annotations[inject.Annotation] != "disabled" && p.Annotations[inject.Annotation] != "false" && !p.Spec.HostNetwork {
			outside = append(outside, ref)
		}
	}
	switch {
	case len(notReady) > 0:
		add("proxies", meshcheck.Fail, "%d of %d injected pods have no ready proxy after %s: %s (kubectl logs POD -c %s)", len(notReady), injected, startupGrace, strings.Join(notReady, ", "), inject.ProxyContainer)
	case ready < injected:
		add("proxies", meshcheck.OK, "%d of %d injected pods have a ready proxy (the others are starting)", ready, injected)
	default:
		add("proxies", meshcheck.OK, "%d of %d injected pods have a ready proxy", ready, injected)
	}
	if len(outside) > 0 {
		add("injection", meshcheck.Warn, "pods of meshed namespaces without the sidecar (created before the label?): %s; restart them (kubectl rollout restart) to join the mesh", strings.Join(outside, ", "))
	}

	certs, err := certpem.ParseCerts([]byte(f.Bundle))
	switch {
	case f.Bundle == "":
		add("trust bundle", meshcheck.Warn, "no ConfigMap %s in %s yet: the control plane publishes it", inject.CAConfigMap, install.Namespace)
	case err != nil || len(certs) == 0:
		add("trust bundle", meshcheck.Fail, "ConfigMap %s/%s holds no certificate: %v", install.Namespace, inject.CAConfigMap, err)
	default:
		rootExpiry(add, certs, now)
	}
	return out
}

func proxyReady(p *corev1.Pod) bool {
	for _, s := range p.Status.InitContainerStatuses {
		if s.Name == inject.ProxyContainer {
			return s.Ready || (s.Started != nil && *s.Started && s.State.Running != nil)
		}
	}
	return false
}

// expiryWarning is how far ahead a root's expiry is reported.
const expiryWarning = 30 * 24 * time.Hour

func rootExpiry(add func(string, meshcheck.Level, string, ...any), certs []*x509.Certificate, now time.Time) {
	for _, c := range certs {
		left := c.NotAfter.Sub(now)
		switch {
		case left <= 0:
			add("trust bundle", meshcheck.Fail, "root %q expired on %s", c.Subject.CommonName, c.NotAfter.UTC().Format(time.DateOnly))
		case left < expiryWarning:
			add("trust bundle", meshcheck.Warn, "root %q expires on %s, in %d days: rotate it (trellis ca rotate-root)", c.Subject.CommonName, c.NotAfter.UTC().Format(time.DateOnly), int(left.Hours()/24))
		default:
			add("trust bundle", meshcheck.OK, "root %q valid until %s", c.Subject.CommonName, c.NotAfter.UTC().Format(time.DateOnly))
		}
	}
}
