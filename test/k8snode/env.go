package k8snode

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// errNotFound marks a ConfigMap or Secret a pod refers to that does not
// exist (yet): what a kubelet waits for.
var errNotFound = errors.New("not found")

// lookups reads what a container's environment and the pod's volumes refer
// to in the cluster: a ConfigMap's or a Secret's data, errNotFound when the
// object is missing.
type lookups interface {
	configMap(namespace, name string) (map[string][]byte, error)
	secret(namespace, name string) (map[string][]byte, error)
}

// expand replaces $(VAR) in s as a kubelet does in command, args and env
// values: a defined VAR by its value, an undefined one left as written,
// and $$ by a single $.
func expand(s string, vars func(string) (string, bool)) string {
	var b strings.Builder
	checkpoint := 0
	for cursor := 0; cursor < len(s); cursor++ {
		if s[cursor] != '$' || cursor+1 >= len(s) {
			continue
		}
		b.WriteString(s[checkpoint:cursor])
		switch next := s[cursor+1]; next {
		case '$':
			b.WriteByte('$')
			cursor++
		case '(':
			end := strings.IndexByte(s[cursor+2:], ')')
			if end < 0 {
				// Unterminated: kept as written.
				b.WriteString("$(")
				cursor++
				break
			}
			name := s[cursor+2 : cursor+2+end]
			if v, ok := vars(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + name + ")")
			}
			cursor += 2 + end
		default:
			b.WriteString(s[cursor : cursor+2])
			cursor++
		}
		checkpoint = cursor + 1
	}
	b.WriteString(s[checkpoint:])
	return b.String()
}

// fieldValue is the value of a downward API field path of pod, as a
// kubelet gives it to an environment variable or a volume's file.
func fieldValue(pod *corev1.Pod, path string) (string, error) {
	if key, ok := subscript(path, "metadata.annotations"); ok {
		return pod.Annotations[key], nil
	}
	if key, ok := subscript(path, "metadata.labels"); ok {
		return pod.Labels[key], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP":
		return pod.Status.HostIP, nil
	case "status.podIP":
		return pod.Status.PodIP, nil
	case "status.hostIPs":
		var ips []string
		for _, ip := range pod.Status.HostIPs {
			ips = append(ips, ip.IP)
		}
		return strings.Join(ips, ","), nil
	case "status.podIPs":
		var ips []string
		for _, ip := range pod.Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		return strings.Join(ips, ","), nil
	}
	return "", fmt.Errorf("field path %q is not supported by k8snode", path)
}

// subscript reads "prefix['key']".
func subscript(path, prefix string) (string, bool) {
	rest, ok := strings.CutPrefix(path, prefix+"['")
	if !ok {
		return "", false
	}
	return strings.CutSuffix(rest, "']")
}

// formatMap is the downward API's rendering of labels and annotations:
// key="value" lines, sorted by key.
func formatMap(m map[string]string) string {
	var lines []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		lines = append(lines, k+"="+strconv.Quote(m[k]))
	}
	return strings.Join(lines, "\n")
}

// containerEnv resolves a container's environment as a kubelet does:
// envFrom first, then env in order, each value expanding the variables
// defined before it. pod carries the status fields (podIP) the node knows.
func containerEnv(pod *corev1.Pod, c *corev1.Container, l lookups) ([]envVar, error) {
	var env []envVar
	set := func(name, value string) {
		for i := range env {
			if env[i].name == name {
				env[i].value = value
				return
			}
		}
		env = append(env, envVar{name, value})
	}
	lookup := func(name string) (string, bool) {
		for _, e := range env {
			if e.name == name {
				return e.value, true
			}
		}
		return "", false
	}
	for i, from := range c.EnvFrom {
		var data map[string][]byte
		var err error
		optional := false
		switch {
		case from.ConfigMapRef != nil:
			optional = from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional
			data, err = l.configMap(pod.Namespace, from.ConfigMapRef.Name)
		case from.SecretRef != nil:
			optional = from.SecretRef.Optional != nil && *from.SecretRef.Optional
			data, err = l.secret(pod.Namespace, from.SecretRef.Name)
		default:
			return nil, fmt.Errorf("envFrom[%d]: neither configMapRef nor secretRef", i)
		}
		if errors.Is(err, errNotFound) && optional {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("envFrom[%d]: %w", i, err)
		}
		for _, k := range slices.Sorted(maps.Keys(data)) {
			set(from.Prefix+k, string(data[k]))
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, lookup))
			continue
		}
		v, err := envSource(pod, e.ValueFrom, l)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		set(e.Name, v)
	}
	return env, nil
}

type envVar struct{ name, value string }

func envSource(pod *corev1.Pod, src *corev1.EnvVarSource, l lookups) (string, error) {
	keyOf := func(data map[string][]byte, err error, kind, name, key string, optional *bool) (string, error) {
		opt := optional != nil && *optional
		if errors.Is(err, errNotFound) && opt {
			return "", nil
		}
		if err != nil {
			return "", err
		}
		v, ok := data[key]
		if !ok && !opt {
			return "", fmt.Errorf("%s %s has no key %q", kind, name, key)
		}
		return string(v), nil
	}
	switch {
	case src.FieldRef != nil:
		return fieldValue(pod, src.FieldRef.FieldPath)
	case src.ConfigMapKeyRef != nil:
		r := src.ConfigMapKeyRef
		data, err := l.configMap(pod.Namespace, r.Name)
		return keyOf(data, err, "configmap", r.Name, r.Key, r.Optional)
	case src.SecretKeyRef != nil:
		r := src.SecretKeyRef
		data, err := l.secret(pod.Namespace, r.Name)
		return keyOf(data, err, "secret", r.Name, r.Key, r.Optional)
	}
	return "", errors.New("valueFrom: only fieldRef, configMapKeyRef and secretKeyRef are supported by k8snode")
}

// commandLine is the container's command and args with $(VAR) expanded
// from its environment.
func commandLine(c *corev1.Container, env []envVar) corev1.Container {
	vars := func(name string) (string, bool) {
		for _, e := range env {
			if e.name == name {
				return e.value, true
			}
		}
		return "", false
	}
	out := *c
	out.Command = make([]string, len(c.Command))
	for i, s := range c.Command {
		out.Command[i] = expand(s, vars)
	}
	out.Args = make([]string, len(c.Args))
	for i, s := range c.Args {
		out.Args[i] = expand(s, vars)
	}
	return out
}
