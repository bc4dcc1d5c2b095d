package webhook

import (
	"encoding/json"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	kjson "k8s.io/apimachinery/pkg/util/json"
)

// operation is one RFC 6902 JSON patch operation.
type operation struct {
	Op    string          `json:"op"`
	Path  string          `json:"path"`
	Value json.RawMessage `json:"value"`
}

// jsonPatch returns the JSON patch that turns raw, the pod as the API
// server sent it (decoded as before), into after. Injection changes three
// fields, each patched whole: the annotations, the init containers and the
// volumes; and the HTTP probes of the application's containers, which it
// moves to the proxy, each patched alone. Anything else changed is an
// error rather than a pod admitted half injected.
func jsonPatch(raw []byte, before, after *corev1.Pod) ([]byte, error) {
	if err := onlyPatchedFields(before, after); err != nil {
		return nil, err
	}
	var doc struct {
		Metadata map[string]json.RawMessage `json:"metadata"`
		Spec     map[string]json.RawMessage `json:"spec"`
	}
	if err := kjson.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("request.object: %w", err)
	}
	// Paths into a missing parent do not apply; a pod has both.
	if doc.Metadata == nil || doc.Spec == nil {
		return nil, errors.New("request.object has no metadata or no spec")
	}
	var ops []operation
	// add creates a member, replace needs one: use each where it applies
	// (add would do for both, but says less about what it expects).
	set := func(parent map[string]json.RawMessage, path, key string, value json.RawMessage) {
		op := "add"
		if _, ok := parent[key]; ok {
			op = "replace"
		}
		ops = append(ops, operation{Op: op, Path: path + "/" + key, Value: value})
	}

	if !equality.Semantic.DeepEqual(before.Annotations, after.Annotations) {
		v, err := json.Marshal(after.Annotations)
		if err != nil {
			return nil, err
		}
		set(doc.Metadata, "/metadata", "annotations", v)
	}
	if !equality.Semantic.DeepEqual(before.Spec.InitContainers, after.Spec.InitContainers) {
		v, err := list(doc.Spec["initContainers"], before.Spec.InitContainers, after.Spec.InitContainers, func(c *corev1.Container) string { return c.Name })
		if err != nil {
			return nil, fmt.Errorf("spec.initContainers: %w", err)
		}
		set(doc.Spec, "/spec", "initContainers", v)
	}
	for i := range after.Spec.Containers {
		b, a := &before.Spec.Containers[i], &after.Spec.Containers[i]
		for _, p := range []struct {
			field         string
			before, after *corev1.Probe
		}{{"livenessProbe", b.LivenessProbe, a.LivenessProbe}, {"readinessProbe", b.ReadinessProbe, a.ReadinessProbe}, {"startupProbe", b.StartupProbe, a.StartupProbe}} {
			if equality.Semantic.DeepEqual(p.before, p.after) {
				continue
			}
			v, err := json.Marshal(p.after)
			if err != nil {
				return nil, err
			}
			// Injection rewrites a probe the container has: replace.
			ops = append(ops, operation{Op: "replace", Path: fmt.Sprintf("/spec/containers/%d/%s", i, p.field), Value: v})
		}
	}
	if !equality.Semantic.DeepEqual(before.Spec.Volumes, after.Spec.Volumes) {
		v, err := list(doc.Spec["volumes"], before.Spec.Volumes, after.Spec.Volumes, func(v *corev1.Volume) string { return v.Name })
		if err != nil {
			return nil, fmt.Errorf("spec.volumes: %w", err)
		}
		set(doc.Spec, "/spec", "volumes", v)
	}
	return json.Marshal(ops)
}

// onlyPatchedFields checks that injection changed nothing but the fields
// jsonPatch patches.
func onlyPatchedFields(before, after *corev1.Pod) error {
	b, a := before.DeepCopy(), after.DeepCopy()
	for _, p := range []*corev1.Pod{a, b} {
		p.Annotations, p.Spec.InitContainers, p.Spec.Volumes = nil, nil, nil
		for i := range p.Spec.Containers {
			c := &p.Spec.Containers[i]
			c.LivenessProbe, c.ReadinessProbe, c.StartupProbe = nil, nil, nil
		}
	}
	if !equality.Semantic.DeepEqual(a, b) {
		return errors.New("injection changed a field other than metadata.annotations, spec.initContainers, spec.volumes and the containers' probes")
	}
	return nil
}

// list is the JSON of a list of named items (containers, volumes) after
// injection. An item injection left alone keeps the JSON the API server
// sent: a field this build's API types do not know (a newer API server's)
// would otherwise be dropped from the user's containers by replacing the
// whole list.
func list[T any](raw json.RawMessage, before, after []T, name func(*T) string) (json.RawMessage, error) {
	var orig []json.RawMessage
	if len(raw) > 0 {
		if err := kjson.Unmarshal(raw, &orig); err != nil {
			return nil, err
		}
	}
	if len(orig) != len(before) {
		// Both come from the same JSON, so this does not happen; should
		// it, every item is written from its typed value.
		orig = nil
	}
	items := make([]json.RawMessage, len(after))
	for i := range after {
		for j := range orig {
			if name(&before[j]) == name(&after[i]) && equality.Semantic.DeepEqual(before[j], after[i]) {
				items[i] = orig[j]
				break
			}
		}
		if items[i] == nil {
			v, err := json.Marshal(&after[i])
			if err != nil {
				return nil, err
			}
			items[i] = v
		}
	}
	return json.Marshal(items)
}
