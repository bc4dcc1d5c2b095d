// Package install writes the manifests that install Trellis in a
// Kubernetes cluster: its namespace, the CRDs, the control plane's service
// account with the least privilege it needs, its Deployment and Service,
// and the sidecar injector's webhook configuration.
package install

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io/fs"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/deploy"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// Names of what the manifests create.
const (
	Namespace   = "trellis-system"
	Name        = "trellis-control-plane"
	WebhookName = "trellis-sidecar-injector"
	// CASecret keeps the control plane's CA (its state file, keys
	// included), created on its first start.
	CASecret = "trellis-ca"
)

// Ports of the control plane.
const (
	ProxyPort   = 15012 // identity and discovery for proxies (gRPC, mTLS)
	AdminPort   = 15014 // admin API (HTTPS; /healthz unauthenticated)
	WebhookPort = 15017 // admission webhook (HTTPS)
)

// Paths in the control plane's container.
const (
	configDir = "/etc/trellis"
	stateDir  = "/var/lib/trellis"
)

// WebhookPath is where the injector serves admission reviews.
const WebhookPath = "/inject"

// RootSecret is the Secret Render writes when given the root's files.
const RootSecret = "trellis-root"

// Options are what an install may choose.
type Options struct {
	Image       string // the trellis image
	ProxyImage  string // the trellis-proxy image
	TrustDomain string
	// RootCertPEM and RootKeyPEM, together, are the root the CA is made
	// from (written into the Secret RootSecret); RootSecret names an
	// existing kubernetes.io/tls Secret of trellis-system instead (one
	// cert-manager keeps). Neither: the control plane makes its own root.
	RootCertPEM, RootKeyPEM []byte
	RootSecret              string
	// Replicas of the control plane (default 1). Several share the CA
	// through its Secret (the first to start creates it), and every one
	// serves proxies: endpoints come from the pods, not from which
	// replica a proxy is connected to.
	Replicas int32
}

// Render returns the manifests as one YAML stream, CRDs first.
func Render(o Options) ([]byte, error) {
	if o.Image == "" || o.ProxyImage == "" {
		return nil, fmt.Errorf("install: the images are required: give --image (trellis) and --proxy-image (trellis-proxy)")
	}
	if o.TrustDomain == "" {
		o.TrustDomain = meshid.DefaultTrustDomain
	}
	if _, err := spiffeid.TrustDomainFromString(o.TrustDomain); err != nil {
		return nil, fmt.Errorf("--trust-domain: %w", err)
	}
	if o.Replicas == 0 {
		o.Replicas = 1
	}
	if o.Replicas < 0 {
		return nil, fmt.Errorf("--replicas %d: give a positive number", o.Replicas)
	}
	if (len(o.RootCertPEM) > 0) != (len(o.RootKeyPEM) > 0) {
		return nil, fmt.Errorf("--root-cert and --root-key go together: give both, or neither")
	}
	if len(o.RootCertPEM) > 0 {
		if o.RootSecret != "" {
			return nil, fmt.Errorf("--root-cert/--root-key and --root-secret are two ways to give the root: give one")
		}
		if err := checkRoot(o.RootCertPEM, o.RootKeyPEM); err != nil {
			return nil, err
		}
		o.RootSecret = RootSecret
	}

	var out bytes.Buffer
	crds, err := fs.Glob(deploy.CRDs, "crds/*.yaml")
	if err != nil {
		return nil, err
	}
	slices.Sort(crds)
	for _, name := range crds {
		data, err := fs.ReadFile(deploy.CRDs, name)
		if err != nil {
			return nil, err
		}
		out.WriteString("---\n")
		out.Write(bytes.TrimPrefix(data, []byte("---\n")))
	}

	labels := map[string]string{"app.kubernetes.io/name": Name, "app.kubernetes.io/part-of": "trellis"}
	meta := func(name string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: name, Namespace: Namespace, Labels: labels}
	}
	objects := []any{
		&corev1.Namespace{TypeMeta: typeMeta("v1", "Namespace"), ObjectMeta: metav1.ObjectMeta{Name: Namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "trellis"}}},
		&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: meta(Name)},
		clusterRole(labels),
		&rbacv1.ClusterRoleBinding{
			TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
			ObjectMeta: metav1.ObjectMeta{Name: Name, Labels: labels},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: Name},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: Name, Namespace: Namespace}},
		},
		namespaceRole(meta(Name), CASecret, o.RootSecret),
		&rbacv1.RoleBinding{
			TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"),
			ObjectMeta: meta(Name),
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: Name},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: Name, Namespace: Namespace}},
		},
		configMap(meta(Name), o.TrustDomain),
		service(meta(Name), labels),
		deployment(meta(Name), labels, o),
		webhook(labels),
	}
	if len(o.RootCertPEM) > 0 {
		objects = append(objects, rootSecret(meta(RootSecret), o))
	}
	if o.Replicas > 1 {
		// A node drain leaves at least one control plane serving.
		objects = append(objects, &policyv1.PodDisruptionBudget{
			TypeMeta:   typeMeta("policy/v1", "PodDisruptionBudget"),
			ObjectMeta: meta(Name),
			Spec: policyv1.PodDisruptionBudgetSpec{
				MaxUnavailable: ptr.To(intstr.FromInt32(1)),
				Selector:       &metav1.LabelSelector{MatchLabels: labels},
			},
		})
	}
	for _, obj := range objects {
		data, err := yaml.Marshal(obj)
		if err != nil {
			return nil, err
		}
		out.WriteString("---\n")
		out.Write(cleanup(data))
	}
	return out.Bytes(), nil
}

func typeMeta(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}

// cleanup drops the empty fields typed objects marshal (status: {},
// creationTimestamp: null). None of these objects has an empty mapping
// that means something (the state emptyDir names its medium).
func cleanup(data []byte) []byte {
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		return data
	}
	prune(m)
	out, err := yaml.Marshal(m)
	if err != nil {
		return data
	}
	return out
}

func prune(v any) bool {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			if e == nil || prune(e) {
				delete(t, k)
			}
		}
		return len(t) == 0
	case []any:
		for _, e := range t {
			prune(e)
		}
		return false
	}
	return false
}

// clusterRole is what the control plane reads cluster-wide, and the little
// it writes: its resources' status, events, the trust bundle ConfigMap in
// each namespace, token reviews, and its own webhook's CA bundle.
func clusterRole(labels map[string]string) *rbacv1.ClusterRole {
	read := []string{"get", "list", "watch"}
	return &rbacv1.ClusterRole{
		TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "ClusterRole"),
		ObjectMeta: metav1.ObjectMeta{Name: Name, Labels: labels},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"namespaces", "pods", "services"}, Verbs: read},
			{APIGroups: []string{"security.trellis.dev"}, Resources: []string{"peerauthentications", "authorizationpolicies"}, Verbs: read},
			{APIGroups: []string{"networking.trellis.dev"}, Resources: []string{"serviceentries", "destinationrules", "virtualservices"}, Verbs: read},
			{APIGroups: []string{"security.trellis.dev"}, Resources: []string{"peerauthentications/status", "authorizationpolicies/status"}, Verbs: []string{"update"}},
			{APIGroups: []string{"networking.trellis.dev"}, Resources: []string{"serviceentries/status", "destinationrules/status", "virtualservices/status"}, Verbs: []string{"update"}},
			{APIGroups: []string{"", "events.k8s.io"}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
			{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{inject.CAConfigMap}, Verbs: []string{"get", "update"}},
			// create cannot be limited by name.
			{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
			{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
			{APIGroups: []string{"admissionregistration.k8s.io"}, Resources: []string{"mutatingwebhookconfigurations"}, ResourceNames: []string{WebhookName}, Verbs: []string{"get", "update"}},
		},
	}
}

// namespaceRole is what the control plane may do in its own namespace:
// keep the CA in a Secret, and elect the replica that writes it.
func namespaceRole(meta metav1.ObjectMeta, caSecret, rootSecret string) *rbacv1.Role {
	r := &rbacv1.Role{
		TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "Role"),
		ObjectMeta: meta,
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{caSecret}, Verbs: []string{"get", "update"}},
			{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
			// The Lease of the control plane that keeps the CA in its
			// Secret, named like it.
			{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{caSecret}, Verbs: []string{"get", "update"}},
			{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
		},
	}
	if rootSecret != "" {
		r.Rules = append(r.Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{rootSecret}, Verbs: []string{"get"}})
	}
	return r
}

// rootSecret holds the user's root, given as files.
func rootSecret(meta metav1.ObjectMeta, o Options) *corev1.Secret {
	return &corev1.Secret{
		TypeMeta:   typeMeta("v1", "Secret"),
		ObjectMeta: meta,
		Type:       corev1.SecretTypeTLS,
		Data:       map[string][]byte{corev1.TLSCertKey: o.RootCertPEM, corev1.TLSPrivateKeyKey: o.RootKeyPEM},
	}
}

// checkRoot refuses a root the control plane could not sign with.
func checkRoot(certPEM, keyPEM []byte) error {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("--root-cert/--root-key: %w", err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("--root-cert: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return fmt.Errorf("--root-cert: %s is not a CA certificate (basicConstraints CA:TRUE)", cert.Subject)
	}
	return nil
}

func service(meta metav1.ObjectMeta, labels map[string]string) *corev1.Service {
	return &corev1.Service{
		TypeMeta:   typeMeta("v1", "Service"),
		ObjectMeta: meta,
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports: []corev1.ServicePort{
				{Name: "grpc-proxies", Port: ProxyPort, TargetPort: intstr.FromInt32(ProxyPort), AppProtocol: ptr.To("grpc")},
				{Name: "https-admin", Port: AdminPort, TargetPort: intstr.FromInt32(AdminPort)},
				{Name: "https-webhook", Port: 443, TargetPort: intstr.FromInt32(WebhookPort)},
			},
		},
	}
}

// configMap is the control plane's configuration file: the cluster
// declares workloads, services and resources, so it says only where to
// listen and keep state.
func configMap(meta metav1.ObjectMeta, trustDomain string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		TypeMeta:   typeMeta("v1", "ConfigMap"),
		ObjectMeta: meta,
		Data: map[string]string{"control-plane.yaml": fmt.Sprintf(`apiVersion: trellis.dev/v1
kind: ControlPlane
trustDomain: %s
stateDir: %s
listen: 0.0.0.0:%d
adminListen: 0.0.0.0:%d
`, trustDomain, stateDir, ProxyPort, AdminPort)},
	}
}

// deployment runs the control planes: the CA's state lives in an
// emptyDir and is kept in a Secret, so a restarted pod, or another
// replica, signs with the same CA.
func deployment(meta metav1.ObjectMeta, labels map[string]string, o Options) *appsv1.Deployment {
	args := []string{"control-plane", "--config", configDir + "/control-plane.yaml", "--init",
		"--kubernetes", "--proxy-image", o.ProxyImage, "--ca-secret", Namespace + "/" + CASecret,
		"--webhook-listen", fmt.Sprintf("0.0.0.0:%d", WebhookPort)}
	if o.RootSecret != "" {
		args = append(args, "--root-secret", Namespace+"/"+o.RootSecret)
	}
	if o.Replicas > 1 {
		args = append(args, "--leader-elect")
	}
	probe := func(period int32) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: "/healthz", Port: intstr.FromInt32(AdminPort), Scheme: corev1.URISchemeHTTPS,
		}}, PeriodSeconds: period}
	}
	pod := corev1.PodSpec{
		ServiceAccountName: Name,
		// Its own sidecar would have to ask itself for a certificate.
		Containers: []corev1.Container{{
			Name:  "control-plane",
			Image: o.Image,
			Args:  args,
			Ports: []corev1.ContainerPort{
				{Name: "grpc-proxies", ContainerPort: ProxyPort},
				{Name: "https-admin", ContainerPort: AdminPort},
				{Name: "https-webhook", ContainerPort: WebhookPort},
			},
			ReadinessProbe: probe(2),
			LivenessProbe:  probe(10),
			Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
				corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi"),
			}},
			SecurityContext: &corev1.SecurityContext{
				RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To[int64](65532), RunAsGroup: ptr.To[int64](65532),
				AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
				Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			},
			VolumeMounts: []corev1.VolumeMount{
				{Name: "config", MountPath: configDir, ReadOnly: true},
				{Name: "state", MountPath: stateDir},
			},
		}},
		Volumes: []corev1.Volume{
			{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: Name}}}},
			{Name: "state", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}},
		},
		SecurityContext: &corev1.PodSecurityContext{FSGroup: ptr.To[int64](65532)},
	}
	podMeta := metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{inject.Annotation: "disabled"}}
	d := &appsv1.Deployment{
		TypeMeta:   typeMeta("apps/v1", "Deployment"),
		ObjectMeta: meta,
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(o.Replicas),
			// A new control plane is up before an old one goes.
			Strategy: appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType, RollingUpdate: &appsv1.RollingUpdateDeployment{
				MaxUnavailable: ptr.To(intstr.FromInt32(0)), MaxSurge: ptr.To(intstr.FromInt32(1)),
			}},
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: podMeta, Spec: pod},
		},
	}
	if o.Replicas > 1 {
		// Spread over nodes, so that one node's loss leaves the others.
		d.Spec.Template.Spec.Affinity = &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
			PreferredDuringSchedulingIgnoredDuringExecution: []corev1.WeightedPodAffinityTerm{{
				Weight: 100,
				PodAffinityTerm: corev1.PodAffinityTerm{
					TopologyKey:   "kubernetes.io/hostname",
					LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
				},
			}},
		}}
	}
	return d
}

// webhook calls the injector for pods of namespaces labelled
// trellis.dev/inject=enabled, and for pods annotated trellis.dev/inject:
// enabled elsewhere (a match condition: selectors see labels only). The
// control plane fills in the CA bundle. Failing closed keeps pods of a
// meshed namespace from starting unmeshed while the control plane is down.
func webhook(labels map[string]string) *admissionv1.MutatingWebhookConfiguration {
	rules := []admissionv1.RuleWithOperations{{
		Operations: []admissionv1.OperationType{admissionv1.Create},
		Rule:       admissionv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}, Scope: ptr.To(admissionv1.NamespacedScope)},
	}}
	client := admissionv1.WebhookClientConfig{Service: &admissionv1.ServiceReference{
		Namespace: Namespace, Name: Name, Path: ptr.To(WebhookPath), Port: ptr.To[int32](443),
	}}
	common := func(name string) admissionv1.MutatingWebhook {
		return admissionv1.MutatingWebhook{
			Name:                    name,
			ClientConfig:            client,
			Rules:                   rules,
			FailurePolicy:           ptr.To(admissionv1.Fail),
			SideEffects:             ptr.To(admissionv1.SideEffectClassNone),
			AdmissionReviewVersions: []string{"v1"},
			TimeoutSeconds:          ptr.To[int32](10),
			ReinvocationPolicy:      ptr.To(admissionv1.IfNeededReinvocationPolicy),
		}
	}
	byNamespace := common("namespace.inject.trellis.dev")
	byNamespace.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{inject.NamespaceLabel: "enabled"}}
	byNamespace.MatchConditions = []admissionv1.MatchCondition{{
		Name:       "not-opted-out",
		Expression: fmt.Sprintf(`!has(object.metadata.annotations) || !(%q in object.metadata.annotations) || !(object.metadata.annotations[%q] in ["disabled", "false"])`, inject.Annotation, inject.Annotation),
	}}
	byPod := common("pod.inject.trellis.dev")
	byPod.NamespaceSelector = &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
		{Key: inject.NamespaceLabel, Operator: metav1.LabelSelectorOpNotIn, Values: []string{"enabled"}},
		{Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"kube-system", Namespace}},
	}}
	byPod.MatchConditions = []admissionv1.MatchCondition{{
		Name:       "opted-in",
		Expression: fmt.Sprintf(`has(object.metadata.annotations) && %q in object.metadata.annotations && object.metadata.annotations[%q] in ["enabled", "true"]`, inject.Annotation, inject.Annotation),
	}}
	return &admissionv1.MutatingWebhookConfiguration{
		TypeMeta:   typeMeta("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"),
		ObjectMeta: metav1.ObjectMeta{Name: WebhookName, Labels: labels},
		Webhooks:   []admissionv1.MutatingWebhook{byNamespace, byPod},
	}
}
