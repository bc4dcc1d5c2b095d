package e2e

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/trellis-mesh/trellis/internal/k8s/resources"
	"github.com/trellis-mesh/trellis/internal/policy"
)

// TestKubernetesResources: the control plane's view of the custom
// resources in a real cluster. Valid resources are applied and marked
// Accepted; an invalid one is marked Accepted False naming the field, gets
// a Warning event, and its previous valid version stays in force; a
// deleted one leaves.
func TestKubernetesResources(t *testing.T) {
	env, ctx, kubectl := startCluster(t, 2*time.Minute)
	installTrellis(t, kubectl)
	kubectl("apiVersion: v1\nkind: Namespace\nmetadata: {name: shipping}\n", "apply", "-f", "-")

	rc, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	broadcaster := record.NewBroadcaster()
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	defer broadcaster.Shutdown()

	var mu sync.Mutex
	var applied [][]policy.SourceFile
	src := resources.New(resources.Config{
		Client: dyn,
		Events: broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "trellis-control-plane"}),
		Apply: func(sources []policy.SourceFile) error {
			// What the control plane does: load them all together.
			if _, err := policy.ParseSources(sources); err != nil {
				return err
			}
			mu.Lock()
			applied = append(applied, sources)
			mu.Unlock()
			return nil
		},
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	inForce := func() []string {
		mu.Lock()
		defer mu.Unlock()
		if len(applied) == 0 {
			return nil
		}
		var out []string
		for _, s := range applied[len(applied)-1] {
			out = append(out, s.Name+"\n"+string(s.Data))
		}
		return out
	}
	condition := func(resource string) (status, reason, message string) {
		out, err := env.Kubectl(ctx, "", "get", resource, "-n", "shipping", "-o", "jsonpath={.status.conditions[0]}")
		if err != nil || out == "" {
			return "", "", ""
		}
		var c struct{ Status, Reason, Message string }
		_ = json.Unmarshal([]byte(out), &c)
		return c.Status, c.Reason, c.Message
	}

	strict := `apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shipping}
spec: {mtls: {mode: STRICT}}
`
	kubectl(strict, "apply", "-f", "-")
	waitFor(t, 30*time.Second, "the PeerAuthentication applied and Accepted", func() bool {
		st, _, _ := condition("peerauthentication/default")
		return st == "True" && slices.ContainsFunc(inForce(), func(s string) bool { return strings.Contains(s, "mode: STRICT") })
	})

	// An edit the schema allows but Trellis refuses: an unsupported field
	// (it would widen the rule if it were dropped).
	deny := `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shipping}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/legacy/sa/*"]}}]}]
`
	kubectl(deny, "apply", "-f", "-")
	waitFor(t, 30*time.Second, "the DENY policy in force", func() bool {
		st, _, _ := condition("authorizationpolicy/deny-legacy")
		return st == "True"
	})
	kubectl(strings.Replace(deny, `principals: ["cluster.local/ns/legacy/sa/*"]`, `requestPrincipals: ["issuer/*"]`, 1), "apply", "-f", "-")
	var msg string
	waitFor(t, 30*time.Second, "the bad edit marked Accepted False", func() bool {
		var st, reason string
		st, reason, msg = condition("authorizationpolicy/deny-legacy")
		return st == "False" && reason == resources.ReasonInvalid
	})
	for _, want := range []string{"spec.rules[0].from[0].source.requestPrincipals", "not supported", "previous version stays in force"} {
		if !strings.Contains(msg, want) {
			t.Errorf("condition message %q lacks %q", msg, want)
		}
	}
	if !slices.ContainsFunc(inForce(), func(s string) bool { return strings.Contains(s, "cluster.local/ns/legacy/sa/*") }) {
		t.Error("the previous valid version of the DENY policy is no longer in force")
	}
	waitFor(t, 30*time.Second, "a Warning event on the rejected policy", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "events", "-n", "shipping", "--field-selector", "involvedObject.name=deny-legacy,type=Warning", "-o", "name")
		return err == nil && strings.TrimSpace(out) != ""
	})
	// The rest is unaffected.
	if st, _, _ := condition("peerauthentication/default"); st != "True" {
		t.Errorf("the valid PeerAuthentication is %q after another resource's bad edit", st)
	}

	// Two ServiceEntries for one host: the newer one is refused as a
	// conflict, the older stays in force, and other changes still apply.
	se := func(name string) string {
		return "apiVersion: networking.trellis.dev/v1\nkind: ServiceEntry\nmetadata: {name: " + name + ", namespace: shipping}\n" +
			"spec: {hosts: [api.partner.example], location: MESH_EXTERNAL, resolution: DNS, ports: [{number: 443, name: https, protocol: TLS}]}\n"
	}
	kubectl(se("partner"), "apply", "-f", "-")
	waitFor(t, 30*time.Second, "the first ServiceEntry in force", func() bool {
		st, _, _ := condition("serviceentry/partner")
		return st == "True"
	})
	kubectl(se("partner-again"), "apply", "-f", "-")
	waitFor(t, 30*time.Second, "the second ServiceEntry refused as a conflict", func() bool {
		st, reason, _ := condition("serviceentry/partner-again")
		return st == "False" && reason == resources.ReasonConflict
	})
	kubectl(strings.Replace(strict, "name: default", "name: after-conflict", 1), "apply", "-f", "-")
	waitFor(t, 30*time.Second, "a later change applied despite the conflict", func() bool {
		in := inForce()
		return slices.ContainsFunc(in, func(s string) bool { return strings.Contains(s, "PeerAuthentication/shipping/after-conflict") }) &&
			slices.ContainsFunc(in, func(s string) bool { return strings.Contains(s, "ServiceEntry/shipping/partner\n") }) &&
			!slices.ContainsFunc(in, func(s string) bool { return strings.Contains(s, "ServiceEntry/shipping/partner-again") })
	})

	// Deleting a resource takes it out of force.
	kubectl("", "delete", "peerauthentication", "default", "-n", "shipping")
	waitFor(t, 30*time.Second, "the deleted PeerAuthentication out of force", func() bool {
		return !slices.ContainsFunc(inForce(), func(s string) bool { return strings.Contains(s, "PeerAuthentication/shipping/default") })
	})
}

// testWriter sends log lines to the test's log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
