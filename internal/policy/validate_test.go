package policy

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

type fieldMessage struct{ Field, Message string }

// TestValidationErrors checks the message and field path of every kind of
// problem the loader reports. Each input is one document.
func TestValidationErrors(t *testing.T) {
	const ap = "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n"
	const pa = "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\n"
	tests := []struct {
		name string
		in   string
		want []fieldMessage
	}{
		{"not a mapping", "- a\n- b\n", []fieldMessage{
			{"", "a document must be a mapping with apiVersion, kind, metadata and spec, not a list"}}},
		{"missing kind", "apiVersion: security.trellis.dev/v1\n", []fieldMessage{
			{"kind", "is required; security resources start with apiVersion: security.trellis.dev/v1 and kind: AuthorizationPolicy or PeerAuthentication"}}},
		{"unsupported version", "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\n", []fieldMessage{
			{"apiVersion", "security.istio.io/v1alpha1 AuthorizationPolicy is not supported; use apiVersion security.trellis.dev/v1 (security.istio.io/v1 and security.istio.io/v1beta1 are accepted as aliases) and kind AuthorizationPolicy or PeerAuthentication"}}},
		{"kind in wrong group", "apiVersion: networking.istio.io/v1\nkind: PeerAuthentication\n", []fieldMessage{
			{"apiVersion", "networking.istio.io/v1 PeerAuthentication is not supported; use apiVersion security.trellis.dev/v1 (security.istio.io/v1 and security.istio.io/v1beta1 are accepted as aliases) and kind AuthorizationPolicy or PeerAuthentication"}}},
		{"kind case", "apiVersion: security.trellis.dev/v1\nkind: authorizationpolicy\n", []fieldMessage{
			{"apiVersion", "security.trellis.dev/v1 authorizationpolicy is not supported; use apiVersion security.trellis.dev/v1 (security.istio.io/v1 and security.istio.io/v1beta1 are accepted as aliases) and kind AuthorizationPolicy or PeerAuthentication"}}},
		{"unknown kind", "apiVersion: security.trellis.dev/v1\nkind: Sidecar\n", []fieldMessage{
			{"kind", `unknown kind "Sidecar" in security.trellis.dev; allowed: AuthorizationPolicy, PeerAuthentication`}}},
		{"request authentication", "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n", []fieldMessage{
			{"kind", "RequestAuthentication (JWT) is not supported by Trellis yet"}}},
		{"no metadata", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\n", []fieldMessage{
			{"metadata", "is required: set metadata.name and metadata.namespace"}}},
		{"bad names", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: Foo_1, namespace: a.b}\n", []fieldMessage{
			{"metadata.name", `"Foo_1" is not a valid name: use lower case letters, digits, '-' and '.', starting and ending with a letter or digit`},
			{"metadata.namespace", `"a.b" is not a valid namespace: use lower case letters, digits and '-', at most 63, starting and ending with a letter or digit`}}},
		{"unknown top-level field", ap + "specs: {}\n", []fieldMessage{
			{"specs", `unknown field "specs"; allowed fields: apiVersion, kind, metadata, spec, status`}}},
		{"unknown metadata field", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns, Labels: {}}\n", []fieldMessage{
			{"metadata.Labels", `unknown field "Labels"; allowed fields: annotations, creationTimestamp, deletionGracePeriodSeconds, deletionTimestamp, finalizers, generateName, generation, labels, managedFields, name, namespace, ownerReferences, resourceVersion, selfLink, uid (did you mean "labels"?)`}}},
		{"bad creation time", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns, creationTimestamp: yesterday}\n", []fieldMessage{
			{"metadata.creationTimestamp", `must be an RFC 3339 time such as 2024-05-01T12:00:00Z, not "yesterday"`}}},
		{"unknown operation field", ap + "spec:\n  rules:\n  - to:\n    - operation:\n        methodz: [GET]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation.methodz", `unknown field "methodz"; allowed fields: hosts, methods, notHosts, notMethods, notPaths, notPorts, paths, ports`}}},
		{"unsupported source field", ap + "spec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: ['*']\n", []fieldMessage{
			{"spec.rules[0].from[0].source.requestPrincipals", "not supported by Trellis yet: request authentication (JWT) is not supported yet"}}},
		{"provider", ap + "spec:\n  action: CUSTOM\n  provider: {name: ext}\n", []fieldMessage{
			{"spec.provider", "not supported by Trellis yet: CUSTOM actions with an external authorizer are not supported yet"},
			{"spec.action", "CUSTOM (an external authorizer) is not supported yet; allowed: ALLOW, DENY, AUDIT"}}},
		{"unknown action", ap + "spec: {action: deny}\n", []fieldMessage{
			{"spec.action", `unknown action "deny"; allowed: ALLOW, DENY, AUDIT (did you mean DENY?)`}}},
		{"action wrong type", ap + "spec: {action: [DENY]}\n", []fieldMessage{
			{"spec.action", "must be a string, not a list"}}},
		{"rules not a list", ap + "spec: {rules: {from: []}}\n", []fieldMessage{
			{"spec.rules", "must be a list, not a mapping"}}},
		{"methods not a list", ap + "spec:\n  rules:\n  - to: [{operation: {methods: GET}}]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation.methods", `must be a list of strings, not a string; write ["GET"]`}}},
		{"numeric port", ap + "spec:\n  rules:\n  - to: [{operation: {ports: [8080]}}]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation.ports[0]", `must be a string, not a number; quote it: "8080"`}}},
		{"invalid port", ap + "spec:\n  rules:\n  - to: [{operation: {ports: ['80*', '0', '65536']}}]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation.ports[0]", `invalid port "80*": write a port number from 1 to 65535 (wildcards are not allowed)`},
			{"spec.rules[0].to[0].operation.ports[1]", `invalid port "0": write a port number from 1 to 65535 (wildcards are not allowed)`},
			{"spec.rules[0].to[0].operation.ports[2]", `invalid port "65536": write a port number from 1 to 65535 (wildcards are not allowed)`}}},
		{"invalid path patterns", ap + "spec:\n  rules:\n  - to: [{operation: {paths: ['/a*b', 'v1', '/x/{**}/{*}', '/x{*}'], notPaths: ['']}}]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation.paths[0]", `invalid path pattern "/a*b": '*' may only be the whole value ("*"), its first character ("*abc") or its last character ("abc*")`},
			{"spec.rules[0].to[0].operation.paths[1]", `invalid path pattern "v1": a path must start with '/', or with '*' for a suffix match`},
			{"spec.rules[0].to[0].operation.paths[2]", `invalid path pattern "/x/{**}/{*}": "{**}" must be the last operator of a path template`},
			{"spec.rules[0].to[0].operation.paths[3]", `invalid path pattern "/x{*}": '{' and '}' may only form a whole path segment "{*}" or "{**}"`},
			{"spec.rules[0].to[0].operation.notPaths[0]", `invalid path pattern "": empty value; write "*" to match any non-empty value`}}},
		{"spiffe principal", ap + "spec:\n  rules:\n  - from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]\n", []fieldMessage{
			{"spec.rules[0].from[0].source.principals[0]", `principals are written without the spiffe:// scheme, as in Istio; write "cluster.local/ns/a/sa/b"`}}},
		{"inner wildcard", ap + "spec:\n  rules:\n  - from: [{source: {principals: ['cluster.local/ns/*/sa/b']}}]\n", []fieldMessage{
			{"spec.rules[0].from[0].source.principals[0]", `invalid value "cluster.local/ns/*/sa/b": '*' may only be the whole value ("*"), its first character ("*abc") or its last character ("abc*")`}}},
		{"invalid ip block", ap + "spec:\n  rules:\n  - from: [{source: {ipBlocks: ['10.0.0.0/33', 'host']}}]\n", []fieldMessage{
			{"spec.rules[0].from[0].source.ipBlocks[0]", `invalid IP block "10.0.0.0/33": write an address such as 10.1.2.3 or a CIDR range such as 10.1.0.0/16`},
			{"spec.rules[0].from[0].source.ipBlocks[1]", `invalid IP block "host": write an address such as 10.1.2.3 or a CIDR range such as 10.1.0.0/16`}}},
		{"empty source", ap + "spec:\n  rules:\n  - from: [{source: {}}]\n", []fieldMessage{
			{"spec.rules[0].from[0].source", "must set at least one of principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks; to match any source, leave out from"}}},
		{"missing operation", ap + "spec:\n  rules:\n  - to: [{}]\n", []fieldMessage{
			{"spec.rules[0].to[0].operation", "is required; set at least one of hosts, notHosts, ports, notPorts, methods, notMethods, paths, notPaths"}}},
		{"when without values", ap + "spec:\n  rules:\n  - when: [{key: source.namespace}]\n", []fieldMessage{
			{"spec.rules[0].when[0]", "must set values or notValues (or both)"}}},
		{"when unknown key", ap + "spec:\n  rules:\n  - when: [{key: source.name, values: [a]}]\n", []fieldMessage{
			{"spec.rules[0].when[0].key", `unknown key "source.name"; allowed: request.headers[NAME], source.ip, source.namespace, source.principal, destination.port`}}},
		{"when jwt key", ap + "spec:\n  rules:\n  - when: [{key: 'request.auth.claims[iss]', values: [a]}]\n", []fieldMessage{
			{"spec.rules[0].when[0].key", `"request.auth.claims[iss]" is not supported by Trellis yet: request authentication (JWT) is not supported yet; allowed: request.headers[NAME], source.ip, source.namespace, source.principal, destination.port`}}},
		{"when sni key", ap + "spec:\n  rules:\n  - when: [{key: connection.sni, values: [a]}]\n", []fieldMessage{
			{"spec.rules[0].when[0].key", `"connection.sni" is not supported by Trellis yet: SNI is not part of the request Trellis evaluates; allowed: request.headers[NAME], source.ip, source.namespace, source.principal, destination.port`}}},
		{"when bad header", ap + "spec:\n  rules:\n  - when: [{key: 'request.headers[a b]', values: [a]}]\n", []fieldMessage{
			{"spec.rules[0].when[0].key", `"request.headers[a b]" is not a valid header key; write request.headers[NAME] with an HTTP header name, e.g. request.headers[x-user-id]`}}},
		{"when bad port", ap + "spec:\n  rules:\n  - when: [{key: destination.port, notValues: ['http']}]\n", []fieldMessage{
			{"spec.rules[0].when[0].notValues[0]", `invalid port "http": write a port number from 1 to 65535 (wildcards are not allowed)`}}},
		{"dry-run value", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns, annotations: {trellis.dev/dry-run: 'yes'}}\n", []fieldMessage{
			{"metadata.annotations[trellis.dev/dry-run]", `must be "true" or "false", not "yes"`}}},
		{"dry-run bool", "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns, annotations: {trellis.dev/dry-run: true}}\n", []fieldMessage{
			{"metadata.annotations[trellis.dev/dry-run]", `must be a string, not a boolean; quote it: "true"`}}},
		{"selector expressions", ap + "spec: {selector: {matchExpressions: []}}\n", []fieldMessage{
			{"spec.selector.matchExpressions", "not supported by Trellis yet: workload selectors only support matchLabels, as in Istio"}}},
		{"bad label", ap + "spec: {selector: {matchLabels: {'-app': 'a b'}}}\n", []fieldMessage{
			{"spec.selector.matchLabels[-app]", `label key "-app" is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit`},
			{"spec.selector.matchLabels[-app]", `label value "a b" is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit`}}},
		{"unknown mode", pa + "spec: {mtls: {mode: strict}}\n", []fieldMessage{
			{"spec.mtls.mode", `unknown mode "strict"; allowed: STRICT, PERMISSIVE, DISABLE, UNSET (did you mean STRICT?)`}}},
		{"port level without selector", pa + "spec:\n  portLevelMtls:\n    8080: {mode: DISABLE}\n", []fieldMessage{
			{"spec.portLevelMtls", "only a workload PeerAuthentication (with spec.selector.matchLabels) can set portLevelMtls; add a selector or move the port settings to a workload policy"}}},
		{"port level bad key and mode", pa + "spec:\n  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    http: {mode: DISABLE}\n    8080: {}\n    9090: {mode: NONE}\n    9091: {mode: OFF}\n", []fieldMessage{
			// YAML 1.1 reads OFF as a boolean.
			{"spec.portLevelMtls[9091].mode", `must be a string, not a boolean; quote it: "false"`},
			{"spec.portLevelMtls[http]", "key must be a port number from 1 to 65535"},
			{"spec.portLevelMtls[8080].mode", "is required; allowed: STRICT, PERMISSIVE, DISABLE, UNSET"},
			{"spec.portLevelMtls[9090].mode", `unknown mode "NONE"; allowed: STRICT, PERMISSIVE, DISABLE, UNSET`}}},
		{"unknown mtls field", pa + "spec: {mtls: {mode: STRICT, strict: true}}\n", []fieldMessage{
			{"spec.mtls.strict", `unknown field "strict"; allowed fields: mode`}}},
		{"dry-run on PeerAuthentication", "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns, annotations: {trellis.dev/dry-run: 'true'}}\n", []fieldMessage{
			{"metadata.annotations[trellis.dev/dry-run]", "dry-run applies to AuthorizationPolicy only; remove it and roll out with mode PERMISSIVE first"}}},
		{"duplicate key", ap + "spec: {action: DENY, action: ALLOW}\n", []fieldMessage{
			{"", `invalid YAML: unmarshal errors:
  line 4: key "action" already set in map; fix the syntax`}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := Parse("p.yaml", []byte(tt.in))
			if set != nil {
				t.Errorf("got a set, want an error")
			}
			var errs Errors
			if !errors.As(err, &errs) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want Errors", err)
			}
			var got []fieldMessage
			for _, e := range errs {
				if e.File != "p.yaml" || e.Document != 1 {
					t.Errorf("error %q names %s document %d, want p.yaml document 1", e, e.File, e.Document)
				}
				got = append(got, fieldMessage{e.Field, e.Message})
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

func TestErrorFormat(t *testing.T) {
	e := &Error{File: "p.yaml", Document: 2, Line: 14, Resource: "AuthorizationPolicy shipping/x", Field: "spec.action", Message: "bad"}
	if got, want := e.Error(), "p.yaml: document 2 (line 14), AuthorizationPolicy shipping/x: spec.action: bad"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}
