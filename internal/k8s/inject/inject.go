// Package inject adds Trellis' sidecar to Kubernetes pods: an init
// container that redirects the pod's TCP to the proxy (the rules trellis up
// installs in a workload's network namespace), and the proxy itself as a
// native sidecar — an init container with restartPolicy Always and a
// startup probe on /ready, so the application starts only once the proxy
// holds its certificate and configuration, and a Job's pod completes
// without anyone stopping the proxy.
//
// The admission webhook injects pods as they are created; trellis inject
// does the same to manifests offline. Injecting twice gives the same pod:
// what an earlier injection added is taken out first.
package inject

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/meshid"
	proxyconfig "github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// Labels and annotations users write.
const (
	// NamespaceLabel "enabled" on a namespace injects its pods.
	NamespaceLabel = "trellis.dev/inject"
	// Annotation on a pod (template): "enabled" injects it whatever its
	// namespace says, "disabled" keeps it out of the mesh.
	Annotation = "trellis.dev/inject"
	// ExcludeInboundPorts and ExcludeOutboundPorts (comma-separated port
	// numbers) reach the application, or leave the pod, without the proxy.
	ExcludeInboundPorts  = "trellis.dev/exclude-inbound-ports"
	ExcludeOutboundPorts = "trellis.dev/exclude-outbound-ports"
)

// Annotations injection writes.
const (
	// StatusAnnotation records that the pod was injected, and by what.
	StatusAnnotation = "trellis.dev/injected"
	// ProxyConfigAnnotation holds the proxy's configuration, which a
	// downward API volume gives the proxy as a file.
	ProxyConfigAnnotation = "trellis.dev/proxy-config"
)

// Names of what injection adds to a pod.
const (
	InitContainer  = "trellis-init"
	ProxyContainer = "trellis-proxy"
	configVolume   = "trellis-proxy-config"
	tokenVolume    = "trellis-token"
	caVolume       = "trellis-ca"
	tmpVolume      = "trellis-tmp"
	// noAPIVolume hides the pod's Kubernetes API token from the sidecar's
	// containers: the ServiceAccount admission plugin mounts it into every
	// container without something at its path, and neither needs the API.
	noAPIVolume = "trellis-no-kube-api"
	apiTokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"
)

// Ports of the injected proxy (those of trellis up's netns sidecars).
const (
	InboundPort  = 15006
	OutboundPort = 15001
	AdminPort    = 15000
	StatsPort    = 15020
	// ProxyUID runs the proxy; interception lets its own connections out
	// unredirected by this uid.
	ProxyUID = 1337
)

// TokenAudience is the audience of the projected service account token a
// proxy proves its pod's identity with.
const TokenAudience = "trellis"

// CAConfigMap is the ConfigMap the control plane keeps in each injected
// namespace with the mesh's trust bundle, which the proxy verifies the
// control plane with before it has a certificate of its own.
const CAConfigMap = "trellis-ca-root"

// Paths in the proxy container.
const (
	ConfigDir = "/etc/trellis/proxy"
	TokenDir  = "/var/run/secrets/trellis"
	CADir     = "/var/run/trellis/ca"
)

// Config is what injection needs to know about the mesh.
type Config struct {
	// ProxyImage is the trellis-proxy image.
	ProxyImage string
	// ControlPlane is host:port of the control plane's proxy API.
	ControlPlane string
	TrustDomain  string
	// Requests are the proxy's resource requests.
	CPURequest, MemoryRequest string
}

// Defaults fills what is unset.
func (c Config) Defaults() Config {
	if c.ControlPlane == "" {
		c.ControlPlane = "trellis-control-plane.trellis-system.svc:15012"
	}
	if c.TrustDomain == "" {
		c.TrustDomain = meshid.DefaultTrustDomain
	}
	if c.CPURequest == "" {
		c.CPURequest = "10m"
	}
	if c.MemoryRequest == "" {
		c.MemoryRequest = "32Mi"
	}
	return c
}

// Wanted reports whether a pod belongs in the mesh: its own annotation
// decides, else its namespace's label. Pods on the host's network are
// never injected (redirecting them would redirect the node).
func Wanted(namespaceLabels map[string]string, pod *metav1.ObjectMeta, spec *corev1.PodSpec) bool {
	if spec.HostNetwork {
		return false
	}
	switch pod.Annotations[Annotation] {
	case "enabled", "true":
		return true
	case "disabled", "false":
		return false
	}
	return namespaceLabels[NamespaceLabel] == "enabled"
}

// Injected reports whether a pod already has the sidecar.
func Injected(spec *corev1.PodSpec) bool {
	return slices.ContainsFunc(spec.InitContainers, func(c corev1.Container) bool { return c.Name == ProxyContainer })
}

// Pod injects the sidecar into a pod (or pod template) of workload name.
// Errors name the annotation or field at fault.
func (c Config) Pod(workload string, meta *metav1.ObjectMeta, spec *corev1.PodSpec) error {
	c = c.Defaults()
	if c.ProxyImage == "" {
		return fmt.Errorf("no proxy image: give the trellis-proxy image to inject")
	}
	if err := meshid.ValidateName("workload name", workload); err != nil {
		return err
	}
	exIn, err := intercept.ParsePorts(meta.Annotations[ExcludeInboundPorts])
	if err != nil {
		return fmt.Errorf("annotation %s: %w", ExcludeInboundPorts, err)
	}
	exOut, err := intercept.ParsePorts(meta.Annotations[ExcludeOutboundPorts])
	if err != nil {
		return fmt.Errorf("annotation %s: %w", ExcludeOutboundPorts, err)
	}
	for i, ct := range spec.Containers {
		if ct.Name == InitContainer || ct.Name == ProxyContainer {
			return fmt.Errorf("spec.containers: a container is named %s, which the sidecar needs: rename it", ct.Name)
		}
		// The interception lets the proxy's user out unredirected: an
		// application running as that user would leave the mesh unseen.
		if sc := ct.SecurityContext; sc != nil && sc.RunAsUser != nil && *sc.RunAsUser == ProxyUID {
			return fmt.Errorf("spec.containers[%d].securityContext.runAsUser: %d is the sidecar's user, whose connections bypass the mesh: run the application as another user", i, ProxyUID)
		}
	}
	if sc := spec.SecurityContext; sc != nil && sc.RunAsUser != nil && *sc.RunAsUser == ProxyUID {
		return fmt.Errorf("spec.securityContext.runAsUser: %d is the sidecar's user, whose connections bypass the mesh: run the application as another user", ProxyUID)
	}
	Remove(meta, spec)

	if meta.Annotations == nil {
		meta.Annotations = map[string]string{}
	}
	probes := moveProbes(spec.Containers)
	cfg, err := proxyConfig(workload, spec.Containers, exIn, probes)
	if err != nil {
		restoreProbes(spec.Containers, probes)
		return err
	}
	meta.Annotations[ProxyConfigAnnotation] = cfg
	meta.Annotations[StatusAnnotation] = c.ProxyImage

	// Always the proxy's own ports inbound (health checks from the
	// kubelet and scrapes reach the stats port directly).
	exIn = append([]int{StatsPort}, exIn...)
	slices.Sort(exIn)
	exIn = slices.Compact(exIn)

	initArgs := []string{"intercept",
		"--inbound-port", strconv.Itoa(InboundPort), "--outbound-port", strconv.Itoa(OutboundPort),
		"--proxy-uid", strconv.Itoa(ProxyUID), "--exclude-inbound-ports", joinPorts(exIn)}
	if len(exOut) > 0 {
		initArgs = append(initArgs, "--exclude-outbound-ports", joinPorts(exOut))
	}
	requests := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse(c.CPURequest),
		corev1.ResourceMemory: resource.MustParse(c.MemoryRequest),
	}
	initC := corev1.Container{
		Name:  InitContainer,
		Image: c.ProxyImage,
		Args:  initArgs,
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr.To[int64](0),
			RunAsNonRoot:             ptr.To(false),
			AllowPrivilegeEscalation: ptr.To(false),
			ReadOnlyRootFilesystem:   ptr.To(true),
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
				Drop: []corev1.Capability{"ALL"},
			},
		},
		Resources:    corev1.ResourceRequirements{Requests: requests},
		VolumeMounts: []corev1.VolumeMount{{Name: noAPIVolume, MountPath: apiTokenDir, ReadOnly: true}},
	}
	proxy := corev1.Container{
		Name:          ProxyContainer,
		Image:         c.ProxyImage,
		RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
		Args: []string{
			"--config", ConfigDir + "/proxy.yaml",
			"--control-plane", "--identity-addr", c.ControlPlane,
			"--ca-bundle", CADir + "/root-cert.pem",
			"--trust-domain", c.TrustDomain,
			"--namespace", "$(POD_NAMESPACE)", "--service-account", "$(SERVICE_ACCOUNT)",
			"--kubernetes-token-file", TokenDir + "/token",
			"--instance", "$(POD_NAME)", "--advertise-ip", "$(POD_IP)",
			"--admin-addr", "127.0.0.1:" + strconv.Itoa(AdminPort),
			"--stats-addr", "0.0.0.0:" + strconv.Itoa(StatsPort),
		},
		Env: []corev1.EnvVar{
			fieldEnv("POD_NAME", "metadata.name"),
			fieldEnv("POD_NAMESPACE", "metadata.namespace"),
			fieldEnv("POD_IP", "status.podIP"),
			fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
		},
		Ports: []corev1.ContainerPort{{Name: "trellis-stats", ContainerPort: StatsPort, Protocol: corev1.ProtocolTCP}},
		StartupProbe: &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(StatsPort)}},
			PeriodSeconds:    1,
			FailureThreshold: 600,
		},
		ReadinessProbe: &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(StatsPort)}},
			PeriodSeconds: 5,
		},
		LivenessProbe: &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/live", Port: intstr.FromInt32(StatsPort)}},
			PeriodSeconds:    10,
			FailureThreshold: 3,
		},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr.To[int64](ProxyUID),
			RunAsGroup:               ptr.To[int64](ProxyUID),
			RunAsNonRoot:             ptr.To(true),
			AllowPrivilegeEscalation: ptr.To(false),
			ReadOnlyRootFilesystem:   ptr.To(true),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		},
		Resources: corev1.ResourceRequirements{Requests: requests},
		VolumeMounts: []corev1.VolumeMount{
			{Name: configVolume, MountPath: ConfigDir, ReadOnly: true},
			{Name: tokenVolume, MountPath: TokenDir, ReadOnly: true},
			{Name: caVolume, MountPath: CADir, ReadOnly: true},
			{Name: tmpVolume, MountPath: "/tmp"},
			{Name: noAPIVolume, MountPath: apiTokenDir, ReadOnly: true},
		},
	}
	// The sidecar starts before the application's containers and any init
	// container the pod already has, which may need the network.
	spec.InitContainers = append([]corev1.Container{initC, proxy}, spec.InitContainers...)
	spec.Volumes = append(spec.Volumes,
		corev1.Volume{Name: configVolume, VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
			Items: []corev1.DownwardAPIVolumeFile{{Path: "proxy.yaml", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['" + ProxyConfigAnnotation + "']"}}},
		}}},
		corev1.Volume{Name: tokenVolume, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: TokenAudience, ExpirationSeconds: ptr.To[int64](3600), Path: "token",
			}}},
		}}},
		corev1.Volume{Name: caVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: CAConfigMap},
		}}},
		corev1.Volume{Name: tmpVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}},
		corev1.Volume{Name: noAPIVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}},
	)
	return nil
}

// Remove takes out what injection added, leaving the pod as it was.
func Remove(meta *metav1.ObjectMeta, spec *corev1.PodSpec) {
	if cfg := meta.Annotations[ProxyConfigAnnotation]; cfg != "" {
		var moved struct {
			AppProbes map[string]proxyconfig.AppProbe `json:"appProbes"`
		}
		if yaml.Unmarshal([]byte(cfg), &moved) == nil {
			restoreProbes(spec.Containers, moved.AppProbes)
		}
	}
	spec.InitContainers = slices.DeleteFunc(spec.InitContainers, func(c corev1.Container) bool {
		return c.Name == InitContainer || c.Name == ProxyContainer
	})
	if len(spec.InitContainers) == 0 {
		spec.InitContainers = nil
	}
	spec.Volumes = slices.DeleteFunc(spec.Volumes, func(v corev1.Volume) bool {
		switch v.Name {
		case configVolume, tokenVolume, caVolume, tmpVolume, noAPIVolume:
			return true
		}
		return false
	})
	if len(spec.Volumes) == 0 {
		spec.Volumes = nil
	}
	delete(meta.Annotations, StatusAnnotation)
	delete(meta.Annotations, ProxyConfigAnnotation)
	if len(meta.Annotations) == 0 {
		meta.Annotations = nil
	}
}

// proxyConfig is the proxy's configuration for the pod: transparent
// listeners and the containers' TCP ports, whose protocol the port name
// declares (http-web, grpc, mysql…). The namespace is the pod's, which
// the proxy takes from --namespace: a manifest injected offline may not
// name it.
func proxyConfig(workload string, containers []corev1.Container, excluded []int, probes map[string]proxyconfig.AppProbe) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: trellis.dev/v1\nkind: ProxyConfig\nworkload: {name: %s}\n", workload)
	fmt.Fprintf(&b, "transparent: {inbound: \"0.0.0.0:%d\", outbound: \"0.0.0.0:%d\", bypass: %s}\n", InboundPort, OutboundPort, proxyconfig.BypassUID)
	var ports []string
	seen := map[int32]bool{}
	for i, ct := range containers {
		for j, p := range ct.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			if slices.Contains(excluded, int(p.ContainerPort)) || seen[p.ContainerPort] {
				continue
			}
			switch p.ContainerPort {
			case InboundPort, OutboundPort, AdminPort, StatsPort:
				return "", fmt.Errorf("spec.containers[%d].ports[%d]: port %d is the sidecar's: move the application to another port", i, j, p.ContainerPort)
			}
			seen[p.ContainerPort] = true
			ports = append(ports, fmt.Sprintf("  - {appPort: %d, protocol: %q}\n", p.ContainerPort, proxyconfig.ParseProtocol(p.Name)))
		}
	}
	if len(ports) > 0 {
		b.WriteString("inbound:\n")
		for _, p := range ports {
			b.WriteString(p)
		}
	}
	if len(probes) > 0 {
		out, err := yaml.Marshal(map[string]any{"appProbes": probes})
		if err != nil {
			return "", err
		}
		b.Write(out)
	}
	return b.String(), nil
}

// moveProbes points the containers' HTTP probes at the proxy's stats
// port (/app-health/CONTAINER/KIND), which makes them on loopback: the
// kubelet's plaintext probe would be refused by a STRICT port. It returns
// what it moved, for the proxy's configuration. A probe on a named port
// the container does not declare is left alone.
func moveProbes(containers []corev1.Container) map[string]proxyconfig.AppProbe {
	moved := map[string]proxyconfig.AppProbe{}
	for i := range containers {
		c := &containers[i]
		for _, pr := range []struct {
			kind  string
			probe *corev1.Probe
		}{{"livez", c.LivenessProbe}, {"readyz", c.ReadinessProbe}, {"startupz", c.StartupProbe}} {
			// A probe of another host is not the pod's to answer.
			if pr.probe == nil || pr.probe.HTTPGet == nil || pr.probe.HTTPGet.Host != "" {
				continue
			}
			g := pr.probe.HTTPGet
			port, ok := containerPort(c, g.Port)
			if !ok {
				continue
			}
			ap := proxyconfig.AppProbe{Port: port, Path: g.Path, Scheme: string(g.Scheme)}
			if ap.Path == "" {
				ap.Path = "/"
			}
			if ap.Scheme == string(corev1.URISchemeHTTP) {
				ap.Scheme = ""
			}
			for _, h := range g.HTTPHeaders {
				if ap.Headers == nil {
					ap.Headers = map[string]string{}
				}
				ap.Headers[h.Name] = h.Value
			}
			key := c.Name + "/" + pr.kind
			moved[key] = ap
			*g = corev1.HTTPGetAction{Path: "/app-health/" + key, Port: intstr.FromInt32(StatsPort), Scheme: corev1.URISchemeHTTP}
		}
	}
	if len(moved) == 0 {
		return nil
	}
	return moved
}

// restoreProbes undoes moveProbes (a named port comes back as its number).
func restoreProbes(containers []corev1.Container, moved map[string]proxyconfig.AppProbe) {
	for i := range containers {
		c := &containers[i]
		for _, pr := range []struct {
			kind  string
			probe *corev1.Probe
		}{{"livez", c.LivenessProbe}, {"readyz", c.ReadinessProbe}, {"startupz", c.StartupProbe}} {
			ap, ok := moved[c.Name+"/"+pr.kind]
			if !ok || pr.probe == nil || pr.probe.HTTPGet == nil {
				continue
			}
			g := corev1.HTTPGetAction{Path: ap.Path, Port: intstr.FromInt32(int32(ap.Port)), Scheme: corev1.URIScheme(ap.Scheme)}
			for _, name := range slices.Sorted(maps.Keys(ap.Headers)) {
				g.HTTPHeaders = append(g.HTTPHeaders, corev1.HTTPHeader{Name: name, Value: ap.Headers[name]})
			}
			*pr.probe.HTTPGet = g
		}
	}
}

// containerPort resolves a probe's port, a number or a port name.
func containerPort(c *corev1.Container, p intstr.IntOrString) (uint32, bool) {
	if p.Type == intstr.Int {
		return uint32(p.IntVal), p.IntVal > 0 && p.IntVal <= 65535
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return uint32(cp.ContainerPort), true
		}
	}
	return 0, false
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
}

func joinPorts(ports []int) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ",")
}
