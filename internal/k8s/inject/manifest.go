package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// templatePaths says where each workload kind keeps its pod template.
var templatePaths = map[string][]string{
	"Deployment":            {"spec", "template"},
	"StatefulSet":           {"spec", "template"},
	"DaemonSet":             {"spec", "template"},
	"ReplicaSet":            {"spec", "template"},
	"ReplicationController": {"spec", "template"},
	"Job":                   {"spec", "template"},
	"CronJob":               {"spec", "jobTemplate", "spec", "template"},
}

// Manifests injects every pod and pod template in a stream of YAML
// documents (Deployments, StatefulSets, DaemonSets, Jobs, CronJobs, Pods,
// and Lists of them) and returns the stream with the other documents
// unchanged. Pods annotated trellis.dev/inject: disabled, and pods on the
// host's network, are left out; everything else is injected, whatever its
// namespace (the cluster's labels are not known offline).
func (c Config) Manifests(data []byte) ([]byte, error) {
	var out bytes.Buffer
	for i, doc := range splitYAML(data) {
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		var obj map[string]any
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		if obj == nil {
			continue
		}
		if err := c.object(obj); err != nil {
			return nil, fmt.Errorf("document %d (%s): %w", i+1, describe(obj), err)
		}
		y, err := yaml.Marshal(obj)
		if err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		if out.Len() > 0 {
			out.WriteString("---\n")
		}
		out.Write(y)
	}
	return out.Bytes(), nil
}

// object injects one object, recursing into Lists.
func (c Config) object(obj map[string]any) error {
	kind, _ := obj["kind"].(string)
	if kind == "List" || strings.HasSuffix(kind, "List") {
		items, _ := obj["items"].([]any)
		for i, it := range items {
			m, ok := it.(map[string]any)
			if !ok {
				continue
			}
			if err := c.object(m); err != nil {
				return fmt.Errorf("items[%d] (%s): %w", i, describe(m), err)
			}
		}
		return nil
	}
	if kind == "Pod" {
		name := nameOf(obj)
		return c.template(obj, name, "")
	}
	path, ok := templatePaths[kind]
	if !ok {
		return nil
	}
	parent := obj
	for _, k := range path[:len(path)-1] {
		next, ok := parent[k].(map[string]any)
		if !ok {
			return fmt.Errorf("%s: missing", strings.Join(path, "."))
		}
		parent = next
	}
	tmpl, ok := parent[path[len(path)-1]].(map[string]any)
	if !ok {
		return fmt.Errorf("%s: missing", strings.Join(path, "."))
	}
	if err := c.template(tmpl, nameOf(obj), strings.Join(path, ".")+"."); err != nil {
		return err
	}
	return nil
}

// template injects a pod or pod template held as a map, in place.
func (c Config) template(m map[string]any, workload, field string) error {
	raw, err := json.Marshal(map[string]any{"metadata": m["metadata"], "spec": m["spec"]})
	if err != nil {
		return err
	}
	// Strictly: a field the pod's schema does not know would be dropped
	// on the way back out.
	var t corev1.PodTemplateSpec
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return fmt.Errorf("%s%v (the field is not in the pod's schema: fix or remove it)", field, err)
	}
	if !Wanted(map[string]string{NamespaceLabel: "enabled"}, &t.ObjectMeta, &t.Spec) {
		return nil
	}
	if err := c.Pod(workload, &t.ObjectMeta, &t.Spec); err != nil {
		return fmt.Errorf("%s%w", field, err)
	}
	raw, err = json.Marshal(struct {
		Metadata any             `json:"metadata"`
		Spec     *corev1.PodSpec `json:"spec"`
	}{t.ObjectMeta, &t.Spec})
	if err != nil {
		return err
	}
	var injected map[string]any
	if err := json.Unmarshal(raw, &injected); err != nil {
		return err
	}
	meta, _ := injected["metadata"].(map[string]any)
	delete(meta, "creationTimestamp")
	if len(meta) == 0 {
		delete(m, "metadata")
	} else {
		m["metadata"] = meta
	}
	m["spec"] = injected["spec"]
	return nil
}

func nameOf(obj map[string]any) string {
	meta, _ := obj["metadata"].(map[string]any)
	name, _ := meta["name"].(string)
	return name
}

func describe(obj map[string]any) string {
	kind, _ := obj["kind"].(string)
	if kind == "" {
		kind = "an object without kind"
	}
	if n := nameOf(obj); n != "" {
		return kind + " " + n
	}
	return kind
}

// splitYAML splits a stream at its "---" document separators.
func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	for line := range bytes.Lines(data) {
		t := bytes.TrimRight(line, "\r\n")
		if bytes.Equal(t, []byte("---")) || bytes.HasPrefix(t, []byte("--- ")) {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.Write(line)
	}
	return append(docs, cur.Bytes())
}

func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for line := range bytes.Lines(doc) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out.Write(line)
		}
	}
	return out.Bytes()
}
