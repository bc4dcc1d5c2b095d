package decision

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// seed003 is the YAML of the reference article in shared/seeds/003
// ("Enforcing Zero-Trust Security with mTLS and Service Identity"),
// verbatim.
const seed003 = `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default-strict-mtls
  namespace: production
spec:
  # Force all services in the namespace to use mutual TLS
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-checkout-to-orders
  namespace: shipping
spec:
  selector:
    matchLabels:
      app: orders-api
  rules:
  - from:
    - source:
        # Identity-based restriction rather than IP-based
        principals: ["cluster.local/ns/default/sa/checkout-service"]
    to:
    - operation:
        methods: ["POST"]
        paths: ["/v1/orders"]
`

const checkout = "cluster.local/ns/default/sa/checkout-service"

// input is a request from checkout to shipping/orders-api on 8080, changed
// by opts.
func input(opts ...func(*Input)) Input {
	in := Input{
		Workload: policy.Workload{Namespace: "shipping", Name: "orders-api", Labels: map[string]string{"app": "orders-api"}},
		Port:     8080,
		Protocol: HTTP,
		Peer:     Peer{Authenticated: true, Principal: checkout},
		Request:  Request{Method: "GET", Path: "/", Host: "orders-api.shipping.svc.cluster.local", Headers: http.Header{}},
	}
	for _, o := range opts {
		o(&in)
	}
	return in
}

func method(m string) func(*Input) { return func(in *Input) { in.Request.Method = m } }
func path(p string) func(*Input)   { return func(in *Input) { in.Request.Path = p } }
func host(h string) func(*Input)   { return func(in *Input) { in.Request.Host = h } }
func port(p uint32) func(*Input)   { return func(in *Input) { in.Port = p } }
func tcp(in *Input)                { in.Protocol = TCP; in.Request = Request{} }
func plaintext(in *Input)          { in.Peer = Peer{IP: in.Peer.IP} }
func from(p string) func(*Input) {
	return func(in *Input) { in.Peer.Authenticated, in.Peer.Principal = true, p }
}
func ip(s string) func(*Input) { return func(in *Input) { in.Peer.IP = netip.MustParseAddr(s) } }
func header(k, v string) func(*Input) {
	return func(in *Input) { in.Request.Headers.Add(k, v) }
}

// workload sets the destination; labels are "k=v" strings.
func workload(ns, name string, labels ...string) func(*Input) {
	return func(in *Input) {
		in.Workload = policy.Workload{Namespace: ns, Name: name, Labels: map[string]string{}}
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			in.Workload.Labels[k] = v
		}
	}
}

// outcome is what a case checks. Policy is the AuthorizationPolicy that
// decided, or the PeerAuthentication when mTLS refused; Rule is -1 when no
// rule decided. Mode, MTLSPolicy, Audit and DryRun are checked only when set.
type outcome struct {
	Decision   string
	DeniedBy   string
	Policy     string
	Rule       int
	Mode       policy.MTLSMode
	MTLSPolicy string
	Audit      string
	DryRun     string
}

func allowed(policy string, rule int) outcome {
	return outcome{Decision: "allow", Policy: policy, Rule: rule}
}
func denied(policy string, rule int) outcome {
	return outcome{Decision: "deny", DeniedBy: ByAuthorization, Policy: policy, Rule: rule}
}
func refused(pa string, mode policy.MTLSMode) outcome {
	return outcome{Decision: "deny", DeniedBy: ByMTLS, Policy: pa, Rule: -1, Mode: mode, MTLSPolicy: pa}
}
func (o outcome) mode(m policy.MTLSMode, pa string) outcome {
	o.Mode, o.MTLSPolicy = m, pa
	return o
}
func (o outcome) audit(p string) outcome  { o.Audit = p; return o }
func (o outcome) dryRun(d string) outcome { o.DryRun = d; return o }

const none = "<none>" // MTLSPolicy of the PERMISSIVE default

func observe(d Decision, want outcome) outcome {
	o := outcome{Decision: verdict(d.Allowed), DeniedBy: d.DeniedBy, Rule: -1}
	switch {
	case d.Authz == nil:
		o.Policy = d.MTLS.Policy.Metadata.Ref()
	case d.Authz.Result.Policy != nil:
		o.Policy, o.Rule = d.Authz.Result.Policy.Ref, d.Authz.Result.Rule
	}
	if want.Mode != "" {
		o.Mode, o.MTLSPolicy = d.MTLS.Mode, none
		if d.MTLS.Policy != nil {
			o.MTLSPolicy = d.MTLS.Policy.Metadata.Ref()
		}
	}
	if want.Audit != "" && d.Authz != nil && d.Authz.Result.Audit != nil {
		o.Audit = fmt.Sprintf("%s/%d", d.Authz.Result.Audit.Ref, d.Authz.Result.AuditRule)
	}
	if want.DryRun != "" && d.Authz != nil && d.Authz.Result.DryRun.Evaluated {
		o.DryRun = verdict(d.Authz.Result.DryRun.Allowed)
	}
	return o
}

// doc builds a YAML stream from documents.
func doc(docs ...string) string { return strings.Join(docs, "---\n") }

func pa(ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: %s, namespace: %s}\nspec:\n%s\n", name, ns, indent(spec))
}

func paAt(ns, name, created, spec string) string {
	return fmt.Sprintf("apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: %s, namespace: %s, creationTimestamp: %q}\nspec:\n%s\n", name, ns, created, indent(spec))
}

func ap(ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: %s, namespace: %s}\nspec:\n%s\n", name, ns, indent(spec))
}

func apDryRun(annotation, ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: %s\n  namespace: %s\n  annotations: {%s: \"true\"}\nspec:\n%s\n", name, ns, annotation, indent(spec))
}

func indent(s string) string {
	if s == "" {
		return "  {}"
	}
	return "  " + strings.ReplaceAll(strings.TrimSpace(s), "\n", "\n  ")
}

type conformanceCase struct {
	name  string
	yaml  string
	input Input
	want  outcome
}

// peerAuthenticationCases follow Istio's "Authentication" concept page
// (sections "Peer authentication", "Policy storage", "Policy precedence",
// "Changing the mTLS mode") and the PeerAuthentication reference.
var peerAuthenticationCases = []conformanceCase{
	// PeerAuthentication reference, "MutualTLS.Mode": with no policy the
	// mode is PERMISSIVE, accepting plaintext and mTLS.
	{"no policy: PERMISSIVE accepts plaintext", "", input(plaintext), allowed("", -1).mode(policy.ModePermissive, none)},
	{"no policy: PERMISSIVE accepts mTLS", "", input(), allowed("", -1).mode(policy.ModePermissive, none)},
	// "Policy storage": a policy without selector in the root namespace is
	// mesh-wide.
	{"mesh-wide STRICT refuses plaintext", pa("trellis-system", "default", "mtls: {mode: STRICT}"),
		input(plaintext), refused("trellis-system/default", policy.ModeStrict)},
	{"mesh-wide STRICT accepts mTLS", pa("trellis-system", "default", "mtls: {mode: STRICT}"),
		input(), allowed("", -1).mode(policy.ModeStrict, "trellis-system/default")},
	// "Policy precedence": namespace-wide overrides mesh-wide.
	{"namespace PERMISSIVE overrides mesh STRICT", doc(
		pa("trellis-system", "default", "mtls: {mode: STRICT}"),
		pa("shipping", "default", "mtls: {mode: PERMISSIVE}")),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, "shipping/default")},
	// "Policy precedence": workload-specific overrides namespace-wide.
	{"workload STRICT overrides namespace PERMISSIVE", doc(
		pa("shipping", "default", "mtls: {mode: PERMISSIVE}"),
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: STRICT}")),
		input(plaintext), refused("shipping/orders", policy.ModeStrict)},
	{"workload policy for other labels does not apply", doc(
		pa("shipping", "default", "mtls: {mode: PERMISSIVE}"),
		pa("shipping", "billing", "selector: {matchLabels: {app: billing}}\nmtls: {mode: STRICT}")),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, "shipping/default")},
	{"namespace policy of another namespace does not apply",
		pa("billing", "default", "mtls: {mode: STRICT}"),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, none)},
	// PeerAuthentication reference, "portLevelMtls": port settings override
	// the workload's for that port only.
	{"port-level DISABLE overrides workload STRICT on its port",
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}"),
		input(plaintext), allowed("", -1).mode(policy.ModeDisable, "shipping/orders")},
	{"port-level setting leaves other ports alone",
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}"),
		input(plaintext, port(9090)), refused("shipping/orders", policy.ModeStrict)},
	// PeerAuthentication reference, "MutualTLS.Mode UNSET": inherit from
	// the parent.
	{"workload UNSET inherits namespace STRICT", doc(
		pa("shipping", "default", "mtls: {mode: STRICT}"),
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: UNSET}")),
		input(plaintext), refused("shipping/default", policy.ModeStrict)},
	{"workload without mtls inherits namespace STRICT", doc(
		pa("shipping", "default", "mtls: {mode: STRICT}"),
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nportLevelMtls:\n  9090: {mode: DISABLE}")),
		input(plaintext), refused("shipping/default", policy.ModeStrict)},
	{"namespace UNSET inherits mesh STRICT", doc(
		pa("trellis-system", "default", "mtls: {mode: STRICT}"),
		pa("shipping", "default", "mtls: {mode: UNSET}")),
		input(plaintext), refused("trellis-system/default", policy.ModeStrict)},
	{"port UNSET inherits the workload's inherited mode", doc(
		pa("trellis-system", "default", "mtls: {mode: STRICT}"),
		pa("shipping", "orders", "selector: {matchLabels: {app: orders-api}}\nportLevelMtls:\n  8080: {mode: UNSET}")),
		input(plaintext), refused("trellis-system/default", policy.ModeStrict)},
	{"mesh UNSET is PERMISSIVE", pa("trellis-system", "default", "mtls: {mode: UNSET}"),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, none)},
	// "Policy storage": workload selectors select workloads of the policy's
	// own namespace, so a selector policy in the root namespace is not
	// mesh-wide.
	{"root-namespace selector policy ignored for other namespaces", doc(
		pa("trellis-system", "default", "mtls: {mode: PERMISSIVE}"),
		pa("trellis-system", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: STRICT}")),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, "trellis-system/default")},
	{"root-namespace selector policy applies in the root namespace", doc(
		pa("trellis-system", "default", "mtls: {mode: PERMISSIVE}"),
		pa("trellis-system", "orders", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: STRICT}")),
		input(plaintext, workload("trellis-system", "orders-api", "app=orders-api")), refused("trellis-system/orders", policy.ModeStrict)},
	// "Policy storage": with several mesh- or namespace-wide policies the
	// newer are ignored; with several workload policies the oldest wins.
	{"conflicting namespace policies: oldest creationTimestamp wins", doc(
		paAt("shipping", "a-newer", "2024-06-01T00:00:00Z", "mtls: {mode: PERMISSIVE}"),
		paAt("shipping", "b-older", "2024-01-01T00:00:00Z", "mtls: {mode: STRICT}")),
		input(plaintext), refused("shipping/b-older", policy.ModeStrict)},
	{"conflicting namespace policies without times: lexical name wins", doc(
		pa("shipping", "b-strict", "mtls: {mode: STRICT}"),
		pa("shipping", "a-permissive", "mtls: {mode: PERMISSIVE}")),
		input(plaintext), allowed("", -1).mode(policy.ModePermissive, "shipping/a-permissive")},
	{"a policy without creation time counts as oldest", doc(
		paAt("shipping", "a-timed", "2024-01-01T00:00:00Z", "mtls: {mode: PERMISSIVE}"),
		pa("shipping", "z-untimed", "mtls: {mode: STRICT}")),
		input(plaintext), refused("shipping/z-untimed", policy.ModeStrict)},
	{"conflicting mesh policies: oldest wins", doc(
		paAt("trellis-system", "old", "2023-01-01T00:00:00Z", "mtls: {mode: STRICT}"),
		paAt("trellis-system", "new", "2024-01-01T00:00:00Z", "mtls: {mode: DISABLE}")),
		input(plaintext), refused("trellis-system/old", policy.ModeStrict)},
	{"conflicting workload policies: oldest wins", doc(
		paAt("shipping", "by-app", "2024-02-01T00:00:00Z", "selector: {matchLabels: {app: orders-api}}\nmtls: {mode: PERMISSIVE}"),
		paAt("shipping", "by-tier", "2024-01-01T00:00:00Z", "selector: {matchLabels: {tier: backend}}\nmtls: {mode: STRICT}")),
		input(plaintext, workload("shipping", "orders-api", "app=orders-api", "tier=backend")), refused("shipping/by-tier", policy.ModeStrict)},
	// The seed's namespace-wide STRICT policy.
	{"seed: production STRICT refuses plaintext", seed003,
		input(plaintext, workload("production", "payments", "app=payments")), refused("production/default-strict-mtls", policy.ModeStrict)},
	{"seed: production STRICT accepts mTLS", seed003,
		input(workload("production", "payments", "app=payments")), allowed("", -1).mode(policy.ModeStrict, "production/default-strict-mtls")},
	{"seed: STRICT in production leaves shipping PERMISSIVE", seed003,
		input(plaintext, workload("shipping", "web", "app=web")), allowed("", -1).mode(policy.ModePermissive, none)},
	// DISABLE: the proxy does not terminate mTLS, so there is no verified
	// identity for authorization ("Authorization" concept page, "Source":
	// principals require mTLS).
	{"DISABLE hides the caller's identity from authorization", doc(
		pa("shipping", "default", "mtls: {mode: DISABLE}"),
		ap("shipping", "allow-checkout", "rules:\n- from: [{source: {principals: ['"+checkout+"']}}]")),
		input(), denied("", -1).mode(policy.ModeDisable, "shipping/default")},
}

// authorizationCases follow Istio's "Authorization" concept page (sections
// "Authorization policy", "Workload selector", "Value matching",
// "Allow-nothing, deny-all and allow-all policy", "Custom conditions",
// "Authenticated and unauthenticated identity", "Using Istio authorization on
// plain TCP protocols", "Dependency on mutual TLS"), the AuthorizationPolicy
// reference, and the "Authorization Policy Dry Run" task.
var authorizationCases = []conformanceCase{
	// "Authorization policy": no ALLOW policy applies → allow.
	{"no AuthorizationPolicy allows", "", input(), allowed("", -1)},
	// The seed's ALLOW policy.
	{"seed: checkout POST /v1/orders allowed", seed003,
		input(method("POST"), path("/v1/orders")), allowed("shipping/allow-checkout-to-orders", 0)},
	{"seed: GET denied", seed003, input(method("GET"), path("/v1/orders")), denied("", -1)},
	{"seed: other principal denied", seed003,
		input(from("cluster.local/ns/default/sa/web"), method("POST"), path("/v1/orders")), denied("", -1)},
	{"seed: plaintext caller denied (principals need mTLS)", seed003,
		input(plaintext, method("POST"), path("/v1/orders")), denied("", -1)},
	{"seed: other path denied", seed003,
		input(method("POST"), path("/v1/orders/1")), denied("", -1)},
	{"seed: query string ignored", seed003,
		input(method("POST"), path("/v1/orders?dry=1")), allowed("shipping/allow-checkout-to-orders", 0)},
	// "Workload selector": policies apply to matching workloads of their
	// namespace only.
	{"seed: workload without the label is not selected", seed003,
		input(workload("shipping", "web", "app=web")), allowed("", -1)},
	{"seed: same labels in another namespace are not selected", seed003,
		input(workload("billing", "orders-api", "app=orders-api")), allowed("", -1)},
	// AuthorizationPolicy reference: a policy in the root namespace applies
	// to all namespaces.
	{"root-namespace policy applies in every namespace",
		ap("trellis-system", "deny-web", "action: DENY\nrules:\n- from: [{source: {principals: ['cluster.local/ns/default/sa/web']}}]"),
		input(from("cluster.local/ns/default/sa/web")), denied("trellis-system/deny-web", 0)},
	{"root-namespace policy selector matches across namespaces",
		ap("trellis-system", "orders-only-post", "selector: {matchLabels: {app: orders-api}}\nrules:\n- to: [{operation: {methods: [POST]}}]"),
		input(workload("billing", "orders-api", "app=orders-api")), denied("", -1)},
	// "Allow-nothing, deny-all and allow-all policy".
	{"ALLOW without rules denies everything", ap("shipping", "allow-nothing", ""),
		input(), denied("", -1)},
	{"rules: [{}] allows everything", ap("shipping", "allow-all", "rules:\n- {}"),
		input(plaintext), allowed("shipping/allow-all", 0)},
	{"DENY without rules has no effect", ap("shipping", "deny-nothing", "action: DENY"),
		input(), allowed("", -1)},
	{"DENY rules: [{}] denies everything", ap("shipping", "deny-all", "action: DENY\nrules:\n- {}"),
		input(), denied("shipping/deny-all", 0)},
	// "Authorization policy": DENY is evaluated before ALLOW.
	{"DENY wins over a matching ALLOW", doc(
		ap("shipping", "allow-all", "rules:\n- {}"),
		ap("shipping", "deny-delete", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]")),
		input(method("DELETE")), denied("shipping/deny-delete", 0)},
	{"non-matching DENY, matching ALLOW", doc(
		ap("shipping", "allow-all", "rules:\n- {}"),
		ap("shipping", "deny-delete", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]")),
		input(method("GET")), allowed("shipping/allow-all", 0)},
	{"one of several ALLOW policies matching is enough", doc(
		ap("shipping", "a-post", "rules:\n- to: [{operation: {methods: [POST]}}]"),
		ap("shipping", "b-get", "rules:\n- to: [{operation: {methods: [GET]}}]")),
		input(method("GET")), allowed("shipping/b-get", 0)},
	// AuthorizationPolicy reference, "Rule": rules OR; from, to and when AND;
	// a source's or operation's fields AND; values OR.
	{"rules OR: second rule matches",
		ap("shipping", "two-rules", "rules:\n- to: [{operation: {methods: [POST]}}]\n- to: [{operation: {paths: ['/healthz']}}]"),
		input(path("/healthz")), allowed("shipping/two-rules", 1)},
	{"from and to AND: from matches, to does not",
		ap("shipping", "p", "rules:\n- from: [{source: {principals: ['"+checkout+"']}}]\n  to: [{operation: {methods: [POST]}}]"),
		input(method("GET")), denied("", -1)},
	{"from entries OR",
		ap("shipping", "p", "rules:\n- from:\n  - source: {principals: ['cluster.local/ns/x/sa/y']}\n  - source: {namespaces: [default]}"),
		input(), allowed("shipping/p", 0)},
	{"to entries OR",
		ap("shipping", "p", "rules:\n- to:\n  - operation: {methods: [POST]}\n  - operation: {paths: ['/']}"),
		input(), allowed("shipping/p", 0)},
	{"source fields AND",
		ap("shipping", "p", "rules:\n- from: [{source: {principals: ['"+checkout+"'], namespaces: [payments]}}]"),
		input(), denied("", -1)},
	{"operation fields AND",
		ap("shipping", "p", "rules:\n- to: [{operation: {methods: [GET], paths: ['/admin']}}]"),
		input(method("GET"), path("/")), denied("", -1)},
	{"values OR", ap("shipping", "p", "rules:\n- to: [{operation: {methods: [GET, POST]}}]"),
		input(method("POST")), allowed("shipping/p", 0)},
	{"when conditions AND",
		ap("shipping", "p", "rules:\n- when:\n  - {key: source.namespace, values: [default]}\n  - {key: 'request.headers[x-tenant]', values: [acme]}"),
		input(header("X-Tenant", "other")), denied("", -1)},
	// AuthorizationPolicy reference: notX fields are negative matches.
	{"notMethods in ALLOW",
		ap("shipping", "p", "rules:\n- to: [{operation: {notMethods: [DELETE]}}]"),
		input(method("DELETE")), denied("", -1)},
	{"notPaths in DENY",
		ap("shipping", "p", "action: DENY\nrules:\n- to: [{operation: {notPaths: ['/public/*']}}]"),
		input(path("/private")), denied("shipping/p", 0)},
	{"notNamespaces in DENY matches other namespaces",
		ap("shipping", "p", "action: DENY\nrules:\n- from: [{source: {notNamespaces: [shipping]}}]"),
		input(), denied("shipping/p", 0)},
	// "Authenticated and unauthenticated identity": principals: ["*"]
	// requires an authenticated caller; notPrincipals: ["*"] matches
	// plaintext.
	{"principals * needs authentication", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['*']}}]"),
		input(plaintext), denied("", -1)},
	{"principals * matches any mTLS caller", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['*']}}]"),
		input(), allowed("shipping/p", 0)},
	{"DENY notPrincipals * refuses plaintext",
		ap("shipping", "require-mtls", "action: DENY\nrules:\n- from: [{source: {notPrincipals: ['*']}}]"),
		input(plaintext), denied("shipping/require-mtls", 0)},
	{"DENY notPrincipals * lets mTLS through",
		ap("shipping", "require-mtls", "action: DENY\nrules:\n- from: [{source: {notPrincipals: ['*']}}]"),
		input(), allowed("", -1)},
	{"namespaces need mTLS", ap("shipping", "p", "rules:\n- from: [{source: {namespaces: ['*']}}]"),
		input(plaintext), denied("", -1)},
	// "Value matching": exact, prefix, suffix, presence.
	{"prefix path", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/v1/*']}}]"),
		input(path("/v1/orders/7")), allowed("shipping/p", 0)},
	{"suffix path", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['*.png']}}]"),
		input(path("/img/a.png")), allowed("shipping/p", 0)},
	{"suffix principal", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['*/sa/checkout-service']}}]"),
		input(), allowed("shipping/p", 0)},
	{"prefix principal", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['cluster.local/ns/default/*']}}]"),
		input(), allowed("shipping/p", 0)},
	{"exact path does not match a longer one", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/v1']}}]"),
		input(path("/v1/")), denied("", -1)},
	// AuthorizationPolicy reference, "Operation.hosts": case-insensitive.
	{"hosts are case-insensitive", ap("shipping", "p", "rules:\n- to: [{operation: {hosts: ['*.Example.com']}}]"),
		input(host("API.example.COM")), allowed("shipping/p", 0)},
	{"notHosts", ap("shipping", "p", "action: DENY\nrules:\n- to: [{operation: {notHosts: ['orders-api.shipping.svc.cluster.local']}}]"),
		input(host("evil.example.com")), denied("shipping/p", 0)},
	// AuthorizationPolicy reference, "Operation.paths" path templates.
	{"path template {*}", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/v1/orders/{*}/items']}}]"),
		input(path("/v1/orders/7/items")), allowed("shipping/p", 0)},
	{"path template {*} is one segment", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/v1/orders/{*}']}}]"),
		input(path("/v1/orders/7/items")), denied("", -1)},
	{"path template {**}", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/v1/{**}']}}]"),
		input(path("/v1/orders/7/items")), allowed("shipping/p", 0)},
	// Istio normalizes paths (RFC 3986) before authorization ("Security
	// Best Practices", "Understand path normalization in authorization
	// policy"): dot segments cannot bypass a DENY.
	{"dot segments are resolved before matching",
		ap("shipping", "deny-admin", "action: DENY\nrules:\n- to: [{operation: {paths: ['/admin', '/admin/*']}}]"),
		input(path("/public/../admin/users")), denied("shipping/deny-admin", 0)},
	// "Custom conditions" and the "Conditions" reference.
	{"request header value", ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x-tenant]', values: [acme]}]"),
		input(header("x-tenant", "acme")), allowed("shipping/p", 0)},
	{"request header absent", ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x-tenant]', values: ['*']}]"),
		input(), denied("", -1)},
	{"request header notValues", ap("shipping", "p", "action: DENY\nrules:\n- when: [{key: 'request.headers[x-debug]', notValues: ['off']}]"),
		input(header("X-Debug", "on")), denied("shipping/p", 0)},
	{"request header notValues does not match an absent header in ALLOW",
		ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x-tenant]', values: ['*'], notValues: [evil]}]"),
		input(), denied("", -1)},
	{"repeated header matched joined", ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x-role]', values: ['a,b']}]"),
		input(header("x-role", "a"), header("x-role", "b")), allowed("shipping/p", 0)},
	{"source.namespace", ap("shipping", "p", "rules:\n- when: [{key: source.namespace, values: [default]}]"),
		input(), allowed("shipping/p", 0)},
	{"source.principal", ap("shipping", "p", "rules:\n- when: [{key: source.principal, notValues: ['"+checkout+"']}]"),
		input(), denied("", -1)},
	{"destination.port", ap("shipping", "p", "rules:\n- when: [{key: destination.port, values: ['8080']}]"),
		input(), allowed("shipping/p", 0)},
	{"source.ip", ap("shipping", "p", "rules:\n- when: [{key: source.ip, values: ['10.0.0.0/8']}]"),
		input(ip("10.1.2.3")), allowed("shipping/p", 0)},
	// AuthorizationPolicy reference, "Source.ipBlocks" and
	// "Operation.ports".
	{"ipBlocks", ap("shipping", "p", "rules:\n- from: [{source: {ipBlocks: ['192.168.0.0/16', '10.9.9.9']}}]"),
		input(ip("10.9.9.9")), allowed("shipping/p", 0)},
	{"notIpBlocks", ap("shipping", "p", "action: DENY\nrules:\n- from: [{source: {notIpBlocks: ['10.0.0.0/8']}}]"),
		input(ip("203.0.113.9")), denied("shipping/p", 0)},
	{"ipBlocks need a known address", ap("shipping", "p", "rules:\n- from: [{source: {ipBlocks: ['0.0.0.0/0']}}]"),
		input(), denied("", -1)},
	{"ports", ap("shipping", "p", "rules:\n- to: [{operation: {ports: ['9090']}}]"),
		input(port(8080)), denied("", -1)},
	{"notPorts", ap("shipping", "p", "rules:\n- to: [{operation: {notPorts: ['9090']}}]"),
		input(port(8080)), allowed("shipping/p", 0)},
	// "Using Istio authorization on plain TCP protocols": HTTP-only fields
	// in an ALLOW rule make it never match TCP; in a DENY rule they are
	// ignored, so the rule denies on its other conditions.
	{"TCP: ALLOW on TCP fields matches", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['"+checkout+"']}}]\n  to: [{operation: {ports: ['8080']}}]"),
		input(tcp), allowed("shipping/p", 0)},
	{"TCP: ALLOW rule with methods never matches", ap("shipping", "p", "rules:\n- from: [{source: {principals: ['"+checkout+"']}}]\n  to: [{operation: {methods: [GET]}}]"),
		input(tcp), denied("", -1)},
	{"TCP: ALLOW rule with a header condition never matches", ap("shipping", "p", "rules:\n- when: [{key: 'request.headers[x]', notValues: [z]}]"),
		input(tcp), denied("", -1)},
	{"TCP: other ALLOW rules still match", ap("shipping", "p", "rules:\n- to: [{operation: {paths: ['/a']}}]\n- from: [{source: {namespaces: [default]}}]"),
		input(tcp), allowed("shipping/p", 1)},
	{"TCP: DENY rule with only HTTP fields denies", ap("shipping", "p", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]"),
		input(tcp), denied("shipping/p", 0)},
	{"TCP: DENY rule ignores HTTP fields but not ports (match)", ap("shipping", "p", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE], ports: ['8080']}}]"),
		input(tcp), denied("shipping/p", 0)},
	{"TCP: DENY rule ignores HTTP fields but not ports (no match)", ap("shipping", "p", "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE], ports: ['9090']}}]"),
		input(tcp), allowed("", -1)},
	{"TCP: DENY rule ignores notPaths and keeps principals", ap("shipping", "p", "action: DENY\nrules:\n- from: [{source: {principals: ['cluster.local/ns/x/sa/y']}}]\n  to: [{operation: {notPaths: ['/ok']}}]"),
		input(tcp), allowed("", -1)},
	// AuthorizationPolicy reference, "Action AUDIT": never changes the
	// decision.
	{"AUDIT does not allow", doc(
		ap("shipping", "allow-post", "rules:\n- to: [{operation: {methods: [POST]}}]"),
		ap("shipping", "audit-all", "action: AUDIT\nrules:\n- {}")),
		input(method("GET")), denied("", -1).audit("shipping/audit-all/0")},
	{"AUDIT does not deny", ap("shipping", "audit-all", "action: AUDIT\nrules:\n- {}"),
		input(), allowed("", -1).audit("shipping/audit-all/0")},
	// "Authorization Policy Dry Run" task: a dry-run policy is evaluated and
	// reported, never enforced.
	{"dry-run DENY is not enforced", apDryRun(policy.DryRunAnnotation, "shipping", "deny-all", "action: DENY\nrules:\n- {}"),
		input(), allowed("", -1).dryRun("deny")},
	{"istio.io/dry-run is an alias", apDryRun(policy.IstioDryRunAnnotation, "shipping", "deny-all", "action: DENY\nrules:\n- {}"),
		input(), allowed("", -1).dryRun("deny")},
	{"dry-run ALLOW is not enforced", apDryRun(policy.DryRunAnnotation, "shipping", "allow-post", "rules:\n- to: [{operation: {methods: [POST]}}]"),
		input(method("GET")), allowed("", -1).dryRun("deny")},
	{"dry-run ALLOW that would match", apDryRun(policy.DryRunAnnotation, "shipping", "allow-get", "rules:\n- to: [{operation: {methods: [GET]}}]"),
		input(method("GET")), allowed("", -1).dryRun("allow")},
	{"dry-run does not hide an enforced DENY", doc(
		apDryRun(policy.DryRunAnnotation, "shipping", "allow-all", "rules:\n- {}"),
		ap("shipping", "deny-all", "action: DENY\nrules:\n- {}")),
		input(), denied("shipping/deny-all", 0).dryRun("deny")},
}

func TestConformance(t *testing.T) {
	for _, group := range []struct {
		name  string
		cases []conformanceCase
	}{{"PeerAuthentication", peerAuthenticationCases}, {"AuthorizationPolicy", authorizationCases}} {
		for _, tt := range group.cases {
			t.Run(group.name+"/"+tt.name, func(t *testing.T) {
				set, err := policy.Parse("case.yaml", []byte(tt.yaml))
				if err != nil {
					t.Fatalf("policies do not load: %v", err)
				}
				m, err := Compile(set, policy.DefaultRootNamespace)
				if err != nil {
					t.Fatal(err)
				}
				d := m.Decide(tt.input)
				if diff := cmp.Diff(tt.want, observe(d, tt.want)); diff != "" {
					t.Errorf("outcome (-want +got):\n%s\nsummary: %s", diff, d.Summary())
				}
				// The allocation-free evaluation agrees with the explained one.
				if d.Authz != nil {
					got := m.Authz().ForWorkload(tt.input.Workload).Evaluate(&d.Request)
					if got != d.Authz.Result {
						t.Errorf("Evaluate = %+v, Explain = %+v", got, d.Authz.Result)
					}
				}
			})
		}
	}
}
