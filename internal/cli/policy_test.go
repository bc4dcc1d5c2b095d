package cli

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The golden files under testdata/policy are the exact output users and
// scripts see; rewrite them with `go test ./internal/cli -run Policy -update`
// after an intended change, and review the diff.
func init() {
	// Other golden tests in this package may define the same flag.
	if flag.Lookup("update") == nil {
		flag.Bool("update", false, "rewrite golden files")
	}
}

func updateGolden() bool {
	f := flag.Lookup("update")
	return f != nil && f.Value.String() == "true"
}

const examplePolicies = "../../examples/policies"

// runTrellis runs the root command with args and returns stdout, stderr and
// the error.
func runTrellis(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	root := NewRoot(&stdout, &stderr)
	root.SetArgs(args)
	err := root.Execute()
	return stdout.String(), stderr.String(), err
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "policy", name)
	if updateGolden() {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (run with -update if intended)\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func TestPolicyExplainGolden(t *testing.T) {
	base := []string{"policy", "explain", "--policies", examplePolicies, "--workload", "shipping/orders-api", "--labels", "app=orders-api"}
	checkout := []string{"--source-principal", "cluster.local/ns/default/sa/checkout-service"}
	tests := []struct {
		name string
		args []string
	}{
		// The example of issue 3: checkout may POST orders but not GET them.
		{"denied-closest-rule", append(append([]string{"--port", "8080"}, checkout...), "--method", "GET", "--path", "/v1/orders")},
		{"allowed", append(append([]string{"--port", "8080"}, checkout...), "--method", "POST", "--path", "/v1/orders")},
		{"denied-by-deny-policy", append(append([]string{"--port", "8080"}, checkout...), "--method", "DELETE", "--path", "/v1/orders/42")},
		{"denied-by-strict-mtls", []string{"--port", "8080", "--plaintext", "--source-ip", "10.0.3.7"}},
		{"port-level-permissive", []string{"--port", "9090", "--plaintext", "--path", "/metrics"}},
		{"tcp", []string{"--port", "8080", "--protocol", "tcp", "--source-principal", "spiffe://cluster.local/ns/payments/sa/settlement"}},
		{"dry-run-would-deny", []string{"--port", "8080", "--source-principal", "cluster.local/ns/marketing/sa/crawler", "--method", "POST", "--path", "/v1/orders", "--header", "x-trace=1", "--host", "orders-api.shipping"}},
	}
	for _, tt := range tests {
		for _, format := range []string{"text", "json"} {
			t.Run(tt.name+"/"+format, func(t *testing.T) {
				args := append(append(append([]string{}, base...), tt.args...), "-o", format)
				stdout, _, err := runTrellis(t, args...)
				if err != nil {
					t.Fatalf("trellis %s: %v", strings.Join(args, " "), err)
				}
				ext := ".txt"
				if format == "json" {
					ext = ".json"
				}
				golden(t, "explain-"+tt.name+ext, stdout)
			})
		}
	}
}

func TestPolicyExplainIssueExample(t *testing.T) {
	stdout, _, err := runTrellis(t, "policy", "explain", "--policies", examplePolicies, "--workload", "shipping/orders-api",
		"--labels", "app=orders-api", "--port", "8080", "--source-principal", "cluster.local/ns/default/sa/checkout-service", "--method", "GET", "--path", "/v1/orders")
	if err != nil {
		t.Fatal(err)
	}
	const want = "denied: no ALLOW policy on shipping/orders-api matched; closest was allow-checkout-to-orders rule 0: method GET not in [POST]\n"
	if !strings.HasPrefix(stdout, want) {
		t.Errorf("first line:\n got %q\nwant %q", strings.SplitAfter(stdout, "\n")[0], want)
	}
}

func TestPolicyExplainFlagErrors(t *testing.T) {
	ok := []string{"policy", "explain", "--policies", examplePolicies, "--workload", "shipping/orders-api", "--port", "8080"}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no caller", ok, "policy explain: say who calls: --source-principal cluster.local/ns/NS/sa/SA for an mTLS caller, or --plaintext"},
		{"both callers", append(ok, "--plaintext", "--source-principal", "cluster.local/ns/a/sa/b"),
			"policy explain: use either --source-principal (an mTLS caller) or --plaintext (no client certificate), not both"},
		{"bad principal", append(ok, "--source-principal", "cluster.local/ns/a/sa/b?x"),
			`policy explain: invalid --source-principal "cluster.local/ns/a/sa/b?x": path segment characters are limited to letters, numbers, dots, dashes, and underscores; write it as cluster.local/ns/NAMESPACE/sa/NAME`},
		{"bad workload", []string{"policy", "explain", "--policies", examplePolicies, "--workload", "orders-api", "--port", "8080", "--plaintext"},
			`policy explain: --workload must be NAMESPACE/NAME, e.g. --workload shipping/orders-api; got "orders-api"`},
		{"no port", []string{"policy", "explain", "--policies", examplePolicies, "--workload", "shipping/orders-api", "--plaintext"},
			"policy explain: --port is required: the workload port the caller connects to, from 1 to 65535"},
		{"bad protocol", append(ok, "--plaintext", "--protocol", "grpc"), `policy explain: unknown --protocol "grpc"; use http or tcp`},
		{"http flag on tcp", append(ok, "--plaintext", "--protocol", "tcp", "--path", "/x"), "policy explain: --path describes an HTTP request; drop it or use --protocol http"},
		{"bad header", append(ok, "--plaintext", "--header", "x-user"), `policy explain: --header "x-user" must be name=value, e.g. --header x-user=alice`},
		{"bad ip", append(ok, "--plaintext", "--source-ip", "10.0.0"), `policy explain: invalid --source-ip "10.0.0"; write an address such as 10.0.3.7`},
		{"bad path", append(ok, "--plaintext", "--path", "v1"), `policy explain: --path "v1" must start with '/'`},
		{"bad output", append(ok, "--plaintext", "-o", "yaml"), `policy explain: unknown output format "yaml"; use -o text or -o json`},
		{"no policies", []string{"policy", "explain", "--workload", "shipping/orders-api", "--port", "8080", "--plaintext"},
			"policy explain: --policies is required; point it at the directory of policy YAML files"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runTrellis(t, tt.args...)
			if err == nil || err.Error() != tt.want {
				t.Errorf("error = %v\nwant %s", err, tt.want)
			}
		})
	}
}

func TestPolicyExplainInvalidPolicies(t *testing.T) {
	_, _, err := runTrellis(t, "policy", "explain", "--policies", "../policy/testdata/bad", "--workload", "shipping/orders-api", "--port", "8080", "--plaintext")
	if err == nil || !strings.Contains(err.Error(), "3 problems in policy files") || !strings.Contains(err.Error(), "run `trellis policy check ../policy/testdata/bad` for details") {
		t.Errorf("error = %v", err)
	}
}

func TestPolicyCheckGolden(t *testing.T) {
	stdout, _, err := runTrellis(t, "policy", "check", examplePolicies)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "check-examples.txt", stdout)

	dir := t.TempDir()
	files := map[string]string{
		"mesh.yaml": `apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: default, namespace: trellis-system, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: newer, namespace: trellis-system, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {name: web-v2, namespace: shop}
spec: {selector: {matchLabels: {app: web, version: v2}}, mtls: {mode: STRICT}}
`,
		"authz.yaml": `apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: shop}
spec:
  action: DENY
---
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {name: lower, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [delete]}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec: {hosts: [example.com], ports: [{number: 443, name: https, protocol: HTTPS}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
`,
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	stdout, _, err = runTrellis(t, "policy", "check", dir)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "check-scopes.txt", strings.ReplaceAll(stdout, dir, "DIR"))

	// A single file works too.
	stdout, _, err = runTrellis(t, "policy", "check", filepath.Join(examplePolicies, "orders.yaml"))
	if err != nil || !strings.Contains(stdout, "valid: 1 file, 1 PeerAuthentication, 1 AuthorizationPolicy") {
		t.Errorf("check of one file: %v\n%s", err, stdout)
	}
}

func TestPolicyCheckErrors(t *testing.T) {
	dir := "../policy/testdata/bad"
	stdout, _, err := runTrellis(t, "policy", "check", dir)
	if err == nil || err.Error() != "policy check: 3 problems in ../policy/testdata/bad; fix them and run the check again" {
		t.Errorf("error = %v", err)
	}
	golden(t, "check-errors.txt", stdout)

	if _, _, err := runTrellis(t, "policy", "check", "no/such/dir"); err == nil || err.Error() != "policy check: no/such/dir does not exist; pass the directory that holds your policy YAML files" {
		t.Errorf("missing directory: error = %v", err)
	}
	if _, _, err := runTrellis(t, "policy", "check"); err == nil || !strings.Contains(err.Error(), "accepts 1 arg(s)") {
		t.Errorf("no directory: error = %v", err)
	}
}
