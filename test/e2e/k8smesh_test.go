package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/test/k8snode"
)

// Images of the mesh's pods, which k8snode runs as programs of this
// machine.
const (
	meshProxyImage = "registry.example/trellis-proxy:test"
	nginxImage     = "registry.example/nginx:stable"
	pythonImage    = "registry.example/python:3"
)

// TestKubernetesMesh runs examples/zero-trust on Kubernetes: a real API
// server and controller manager (1.34), k8snode playing the kubelet (each
// pod in a network namespace of its own, its volumes mounted, init
// containers and native sidecars run as a kubelet runs them), and
// 'trellis control-plane --kubernetes' outside the cluster. The pods of
// ordinary Deployments are injected by the control plane's webhook; their
// init container installs the interception rules, their proxy proves its
// pod's service account with a projected token and takes its certificate
// and configuration from the control plane. Then, with unmodified nginx
// and python programs: checkout places orders, badge-reader is refused by
// policy, legacy (no sidecar) is refused by STRICT mTLS; a deleted replica
// leaves the mesh while checkout keeps being served; and bad resources are
// reported on their status.
func TestKubernetesMesh(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"curl", "nginx", "ip", "iptables", "setpriv", "unshare", "nsenter"} {
		requireTool(t, tool)
	}
	// Root's pyenv shims are no use to the pods' unprivileged users.
	const python = "/usr/bin/python3"
	if _, err := os.Stat(python); err != nil {
		requireTool(t, python)
	}
	// The example's files, where the pods' users can read them whatever
	// the checkout's place (pods mount volumes over /tmp, where CI may
	// have cloned it).
	example := installExample(t, "../../examples/zero-trust", "nginx.conf", "www")
	nginxConf, www := filepath.Join(example, "nginx.conf"), filepath.Join(example, "www")
	// The proxy runs as uid 1337 and mounts a volume over /tmp, where
	// TestMain built it.
	proxy := installProgram(t, proxyBin)

	env, ctx, kubectl := startCluster(t, 5*time.Minute)
	node := k8snode.Start(t, k8snode.Config{
		Kubeconfig: env.Kubeconfig,
		// The control plane listens on the host's side of the bridge.
		HostNames: []string{"trellis-control-plane.trellis-system.svc"},
		Images: map[string]k8snode.Image{
			meshProxyImage: k8snode.Program(proxy),
			// The example's nginx.conf, with its temporary files in the
			// pod's /tmp.
			nginxImage: func(corev1.Container) ([]string, error) {
				return []string{"/usr/sbin/nginx", "-e", "stderr", "-p", "/tmp/", "-c", nginxConf, "-g", "pid /tmp/nginx.pid;"}, nil
			},
			pythonImage: k8snode.Program(python),
		},
	})
	rc, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			out, _ := env.Kubectl(context.Background(), "", "get", "pods,events", "-A", "-o", "wide")
			t.Logf("cluster:\n%s", out)
		}
	}()

	// CRDs, RBAC and the webhook configuration; the control plane itself
	// runs out of the cluster, so its Deployment is left out.
	manifests, err := install.Render(install.Options{Image: "registry.example/trellis:test", ProxyImage: meshProxyImage})
	if err != nil {
		t.Fatal(err)
	}
	var docs []string
	for doc := range strings.SplitSeq(string(manifests), "\n---\n") {
		if !strings.Contains(doc, "\nkind: Deployment\n") && !strings.HasPrefix(doc, "kind: Deployment\n") {
			docs = append(docs, doc)
		}
	}
	kubectl(strings.Join(docs, "\n---\n"), "apply", "-f", "-")
	kubectl("", "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	cfg := fmt.Sprintf("apiVersion: trellis.dev/v1\nkind: ControlPlane\nstateDir: state\nlisten: %q\nadminListen: \"127.0.0.1:%d\"\n",
		netip.AddrPortFrom(node.HostAddr(), 15012), freePort(t))
	if err := os.WriteFile(filepath.Join(dir, "cp.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	background(t, dir, "sidecar injector serving", trellisBin, "control-plane", "--config", "cp.yaml", "--init",
		"--kubernetes", "--kubeconfig", env.Kubeconfig, "--proxy-image", meshProxyImage,
		"--webhook-listen", "127.0.0.1:0", "--webhook-url", "auto")
	waitFor(t, 30*time.Second, "the webhook configuration pointing at the control plane", func() bool {
		out, err := env.Kubectl(ctx, "", "get", "mutatingwebhookconfiguration", install.WebhookName, "-o", "jsonpath={.webhooks[0].clientConfig.url}")
		return err == nil && strings.HasPrefix(out, "https://127.0.0.1:")
	})

	// examples/zero-trust as Deployments, in namespaces labelled for
	// injection.
	kubectl("apiVersion: v1\nkind: Namespace\nmetadata: {name: shipping}\n", "apply", "-f", "-")
	kubectl("", "label", "namespace", "shipping", "default", inject.NamespaceLabel+"=enabled")
	kubectl(fmt.Sprintf(`apiVersion: v1
kind: ServiceAccount
metadata: {name: orders-api, namespace: shipping}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: checkout-service, namespace: default}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: badge-reader, namespace: default}
---
apiVersion: v1
kind: Service
metadata: {name: orders-api, namespace: shipping}
spec:
  selector: {app: orders-api}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: orders-api, namespace: shipping}
spec:
  replicas: 2
  selector: {matchLabels: {app: orders-api}}
  template:
    metadata: {labels: {app: orders-api}}
    spec:
      serviceAccountName: orders-api
      securityContext: {runAsUser: 65534, runAsGroup: 65534}
      containers:
      - name: nginx
        image: %[1]s
        ports: [{name: http, containerPort: 8080}]
        # Injection moves it to the proxy's stats port: the kubelet's
        # plaintext probe would be refused by the STRICT port.
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
        volumeMounts: [{name: tmp, mountPath: /tmp}]
      volumes: [{name: tmp, emptyDir: {}}]
%[2]s%[3]s%[4]s`, nginxImage,
		pythonDeployment("checkout", "checkout-service", "", www),
		pythonDeployment("badge-reader", "badge-reader", "", www),
		pythonDeployment("legacy", "", inject.Annotation+": disabled", www)), "apply", "-f", "-")

	// The example's policies, as custom resources.
	policies, err := filepath.Glob("../../examples/zero-trust/policies/*.yaml")
	if err != nil || len(policies) == 0 {
		t.Fatalf("no policies in examples/zero-trust (%v)", err)
	}
	for _, f := range policies {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		kubectl(istioGroup.ReplaceAllString(string(data), "$1.trellis.dev/v1"), "apply", "-f", "-")
	}

	// Every pod runs and is ready: the sidecars started (startup probe on
	// /ready: certificate and configuration in hand), then the programs.
	ordersPods, err := node.WaitReady(ctx, "shipping", "app=orders-api", 2)
	if err != nil {
		t.Fatal(err)
	}
	pods := map[string]corev1.Pod{}
	for _, app := range []string{"checkout", "badge-reader", "legacy"} {
		ready, err := node.WaitReady(ctx, "default", "app="+app, 1)
		if err != nil {
			t.Fatal(err)
		}
		pods[app] = ready[0]
	}
	for _, p := range append(ordersPods, pods["checkout"], pods["badge-reader"]) {
		if !inject.Injected(&p.Spec) {
			t.Fatalf("pod %s/%s was not injected", p.Namespace, p.Name)
		}
	}
	if legacy := pods["legacy"]; inject.Injected(&legacy.Spec) {
		t.Fatal("the legacy pod, annotated disabled, was injected")
	}

	status := func() string {
		r := run(t, dir, "", trellisBin, "status", "--state-dir", stateDir)
		return r.stdout + r.stderr
	}
	if r := run(t, dir, "", trellisBin, "status", "--state-dir", stateDir, "--wait", "--timeout", "30s"); r.err != nil {
		t.Fatalf("trellis status --wait: %v\n%s%s", r.err, r.stdout, r.stderr)
	} else {
		for _, p := range append(ordersPods, pods["checkout"], pods["badge-reader"]) {
			workload := p.Labels["app"]
			if !strings.Contains(r.stdout, p.Namespace+"/"+workload+"/"+p.Name) {
				t.Errorf("trellis status does not list the proxy of %s/%s:\n%s", p.Namespace, p.Name, r.stdout)
			}
		}
		t.Logf("trellis status:\n%s", r.stdout)
	}

	// trellis check, of the cluster and of the control plane: nothing
	// fails (the control plane runs outside the cluster: a warning).
	if r := run(t, dir, "", trellisBin, "check", "--kubernetes", "--kubeconfig", env.Kubeconfig, "--state-dir", stateDir); r.err != nil {
		t.Errorf("trellis check --kubernetes: %v\n%s%s", r.err, r.stdout, r.stderr)
	} else {
		for _, want := range []string{"ok    CRDs", "ok    injector", "4 of 4 injected pods have a ready proxy", "ok    trust bundle", "WARN  control plane"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("trellis check --kubernetes lacks %q:\n%s", want, r.stdout)
			}
		}
		t.Logf("trellis check --kubernetes:\n%s", r.stdout)
	}

	// curl runs in a pod's namespaces as its program's user.
	curl := func(p corev1.Pod, args ...string) result {
		t.Helper()
		cmd, err := node.Command(ctx, p.Namespace, p.Name, p.Spec.Containers[0].Name, append([]string{"curl", "-sS", "-m", "5"}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err = cmd.Run()
		return result{stdout: out.String(), stderr: errb.String(), err: err}
	}
	const orders = "http://orders-api.shipping/v1/orders"
	order := func(from corev1.Pod) (string, error) {
		r := curl(from, "-X", "POST", "-w", "\n%{http_code}", orders)
		out := strings.TrimSpace(r.stdout)
		i := strings.LastIndex(out, "\n")
		body, code := strings.TrimSpace(out[:max(i, 0)]), out[i+1:]
		if r.err != nil || code != "200" || !strings.HasPrefix(body, "order accepted by orders-api at ") {
			return "", fmt.Errorf("POST %s from %s: %v, HTTP %s %q %s", orders, from.Name, r.err, code, body, r.stderr)
		}
		return strings.TrimPrefix(body, "order accepted by orders-api at "), nil
	}

	// checkout places orders, served by both replicas (nginx answers with
	// its address).
	served := map[string]bool{}
	// The replicas' readiness reaches checkout's sidecar through the
	// control plane's watch of the pods, a moment after the kubelet (here
	// k8snode) reports it.
	waitFor(t, 15*time.Second, "checkout's first order", func() bool {
		_, err := order(pods["checkout"])
		return err == nil
	})
	for i := 0; i < 20 && len(served) < 2; i++ {
		addr, err := order(pods["checkout"])
		if err != nil {
			t.Fatal(err)
		}
		served[addr] = true
	}
	for _, p := range ordersPods {
		if !served[p.Status.PodIP] {
			t.Errorf("orders were served by %v, never by %s (%s)", served, p.Name, p.Status.PodIP)
		}
	}
	// badge-reader may not: 403, naming why.
	r := curl(pods["badge-reader"], "-i", "-X", "POST", orders)
	if r.err != nil || !strings.HasPrefix(r.stdout, "HTTP/1.1 403") || !strings.Contains(strings.ToLower(r.stdout), "x-trellis-denied-by:") {
		t.Errorf("POST from badge-reader: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
	// legacy has no sidecar: its plaintext is refused by STRICT at the
	// replica's own address (there is no kube-proxy: the service's
	// address answers only through a sidecar).
	for _, p := range ordersPods {
		r := curl(pods["legacy"], "-X", "POST", "http://"+p.Status.PodIP+":8080/v1/orders")
		var exit *exec.ExitError
		if !errors.As(r.err, &exit) || (exit.ExitCode() != 52 && exit.ExitCode() != 56) {
			t.Errorf("plaintext POST from legacy to %s: %v %q %s; want the connection closed or reset (curl exit 52 or 56)", p.Name, r.err, r.stdout, r.stderr)
		} else {
			t.Logf("plaintext POST from legacy to %s refused: %s", p.Name, strings.TrimSpace(r.stderr))
		}
	}
	if r := curl(pods["legacy"], "--connect-timeout", "2", "-X", "POST", orders); r.err == nil {
		t.Errorf("legacy reached orders-api through its service: %q", r.stdout)
	} else {
		t.Logf("plaintext POST from legacy to the service failed: %s", strings.TrimSpace(r.stderr))
	}

	// A replica is deleted: the node stops it (SIGTERM, its nginx first,
	// then its sidecar) and its endpoint leaves the mesh; checkout keeps
	// being served meanwhile, by the other replica.
	gone := ordersPods[0]
	kubectl("", "delete", "pod", gone.Name, "-n", "shipping", "--wait=false")
	var failures []string
	calls := 0
	deadline := time.Now().Add(90 * time.Second)
	for {
		_, err := client.CoreV1().Pods("shipping").Get(ctx, gone.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s still in the API 90s after its deletion", gone.Name)
		}
		calls++
		if _, err := order(pods["checkout"]); err != nil {
			failures = append(failures, err.Error())
		}
	}
	t.Logf("%d orders placed while %s stopped, %d failed", calls, gone.Name, len(failures))
	if len(failures) > 0 {
		t.Errorf("orders failed while a replica stopped:\n%s", strings.Join(failures, "\n"))
	}
	waitFor(t, 30*time.Second, "trellis status without the deleted pod's proxy", func() bool {
		return !strings.Contains(status(), gone.Name)
	})
	// Its replacement (the ReplicaSet's) starts meanwhile: orders must
	// not reach it before it is ready (its proxy registers before nginx
	// starts, and its readiness probe fails until nginx answers), nor the
	// deleted replica at all.
	failures = nil
	for range 20 {
		addr, err := order(pods["checkout"])
		if err != nil {
			failures = append(failures, err.Error())
		} else if addr == gone.Status.PodIP {
			t.Fatalf("an order was served by the deleted replica's address %s", addr)
		}
	}
	if len(failures) > 0 {
		t.Errorf("%d of 20 orders failed while the deleted replica's replacement started:\n%s", len(failures), strings.Join(failures, "\n"))
	}
	if _, err := node.WaitReady(ctx, "shipping", "app=orders-api", 2); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "netns", "list").Output(); err != nil || strings.Contains(string(out), "-"+gone.Name+"-") {
		t.Errorf("the deleted pod's network namespace is still there (%v):\n%s", err, out)
	}

	// Resources the control plane refuses are marked so, naming the
	// field; the rest stays in force.
	kubectl(`apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: port-level, namespace: shipping}
spec:
  portLevelMtls: {8080: {mode: DISABLE}}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: bad-principal, namespace: shipping}
spec:
  selector: {matchLabels: {app: orders-api}}
  rules: [{from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/badge-reader"]}}]}]
`, "apply", "-f", "-")
	for _, x := range []struct{ resource, field string }{
		{"peerauthentication/port-level", "spec.portLevelMtls"},
		{"authorizationpolicy/bad-principal", "spec.rules[0].from[0].source.principals[0]"},
	} {
		var cond string
		waitFor(t, 30*time.Second, x.resource+" marked Accepted False", func() bool {
			cond, _ = env.Kubectl(ctx, "", "get", x.resource, "-n", "shipping", "-o", `jsonpath={.status.conditions[?(@.type=="Accepted")].status} {.status.conditions[?(@.type=="Accepted")].message}`)
			return strings.HasPrefix(cond, "False ")
		})
		if !strings.Contains(cond, x.field) {
			t.Errorf("%s: condition %q does not name %s", x.resource, cond, x.field)
		} else {
			t.Logf("%s: Accepted %s", x.resource, cond)
		}
	}
	if _, err := order(pods["checkout"]); err != nil {
		t.Errorf("after the refused resources: %v", err)
	}
	if r := curl(pods["badge-reader"], "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", orders); r.stdout != "403" {
		t.Errorf("POST from badge-reader after the refused resources: %q %v %s", r.stdout, r.err, r.stderr)
	}
}

// pythonDeployment is one of the example's python workloads: http.server
// on 8080 serving the example's www directory, unprivileged.
func pythonDeployment(name, serviceAccount, annotation, www string) string {
	var sa, ann string
	if serviceAccount != "" {
		sa = "\n      serviceAccountName: " + serviceAccount
	}
	if annotation != "" {
		ann = ", annotations: {" + annotation + "}"
	}
	return fmt.Sprintf(`---
apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata: {labels: {app: %[1]s}%[2]s}
    spec:%[3]s
      securityContext: {runAsUser: 65534, runAsGroup: 65534}
      containers:
      - name: %[1]s
        image: %[4]s
        args: ["-m", "http.server", "8080", "--directory", %[5]q]
        ports: [{name: http, containerPort: 8080}]
`, name, ann, sa, pythonImage, www)
}

// installExample copies files and directories of an example where any
// user can read them, outside /tmp, until the test ends.
func installExample(t *testing.T, from string, names ...string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "trellis-e2e-example-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		root := filepath.Join(from, name)
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(from, path)
			dst := filepath.Join(dir, rel)
			if d.IsDir() {
				return os.MkdirAll(dst, 0o755)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			return os.WriteFile(dst, data, 0o644)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// installProgram copies a program where any user can run it, outside
// /tmp (which pods mount volumes over), until the test ends.
func installProgram(t *testing.T, path string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "trellis-e2e-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst := filepath.Join(dir, filepath.Base(path))
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, src); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}
