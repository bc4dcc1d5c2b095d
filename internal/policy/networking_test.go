package policy

import (
	"path/filepath"
	"strings"
	"testing"
)

// The egress TLS origination of the reference document (seed 004), as
// users paste it: port 80 of the external host sent to 443, where the
// sidecar originates mutual TLS with files next to the resources.
const seedEgress = `apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: external-system-service-entry, namespace: project}
spec:
  hosts: [external.example.com]
  location: MESH_EXTERNAL
  ports:
    - {number: 80, name: http-port, protocol: HTTP}
    - {number: 443, name: https-port, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: external-system-dest-rule, namespace: project}
spec:
  host: external.example.com
  trafficPolicy:
    portLevelSettings:
      - port: {number: 443}
        tls:
          mode: MUTUAL
          clientCertificate: mtls/cert.pem
          privateKey: /etc/mtlsfiles/key
          caCertificates: mtls/ca.pem
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: external-system-virtual-service, namespace: project}
spec:
  hosts: [external.example.com]
  http:
    - match: [{port: 80}]
      route:
        - destination: {host: external.example.com, port: {number: 443}}
`

func TestParseEgressSeed(t *testing.T) {
	set, err := Parse(filepath.Join("/etc/trellis", "egress.yaml"), []byte(seedEgress))
	if err != nil {
		t.Fatal(err)
	}
	if len(set.ServiceEntries) != 1 || len(set.DestinationRules) != 1 || len(set.VirtualServices) != 1 {
		t.Fatalf("set: %+v", set)
	}
	tls := set.DestinationRules[0].Spec.For(443)
	if tls == nil || tls.Mode != TLSMutual || tls.ClientCertificate != "/etc/trellis/mtls/cert.pem" || tls.PrivateKey != "/etc/mtlsfiles/key" {
		t.Fatalf("tls for 443 = %+v: relative files resolve against the resource's directory", tls)
	}
	if set.DestinationRules[0].Spec.For(80) != nil {
		t.Fatal("port 80 has TLS settings")
	}
	if r := set.VirtualServices[0].Spec.PortRoutes; len(r) != 1 || r[0] != (PortRoute{Port: 80, Host: "external.example.com", To: 443}) {
		t.Fatalf("routes = %+v", r)
	}
}

func TestNetworkingErrors(t *testing.T) {
	const se = "apiVersion: networking.trellis.dev/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\n"
	const dr = "apiVersion: networking.trellis.dev/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: ns}\n"
	const okSE = se + "spec: {hosts: [a.example.com], ports: [{number: 443, name: https, protocol: HTTPS}]}\n---\n"
	for _, tc := range []struct {
		name, in, field, message string
	}{
		{"no hosts", se + "spec: {ports: [{number: 80, name: http, protocol: HTTP}]}\n", "spec.hosts", "is required"},
		{"wildcard", se + "spec: {hosts: ['*.example.com'], ports: [{number: 80, name: http, protocol: HTTP}]}\n", "spec.hosts[0]", "wildcard"},
		{"protocol", se + "spec: {hosts: [a.example.com], ports: [{number: 80, name: http, protocol: SMTP}]}\n", "spec.ports[0].protocol", "not one of"},
		{"static without addresses", se + "spec: {hosts: [a.example.com], resolution: STATIC, ports: [{number: 80, name: http, protocol: HTTP}], endpoints: [{address: b.example.com}]}\n", "spec.endpoints[0].address", "STATIC"},
		{"unsupported field", se + "spec: {hosts: [a.example.com], ports: [{number: 80, name: http, protocol: HTTP}], addresses: [10.0.0.1]}\n", "spec.addresses", "virtual addresses"},
		{"mutual without key", okSE + dr + "spec: {host: a.example.com, trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: c.pem}}}\n", "spec.trafficPolicy.tls.privateKey", "is required with mode MUTUAL"},
		{"unknown host", okSE + dr + "spec: {host: b.example.com, trafficPolicy: {tls: {mode: SIMPLE}}}\n", "spec.host", "not a host of any ServiceEntry"},
		{"istio mutual outside", okSE + dr + "spec: {host: a.example.com, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}\n", "spec.trafficPolicy.tls.mode", "cannot speak"},
		{"no such port", okSE + dr + "spec: {host: a.example.com, trafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {mode: SIMPLE}}]}}\n", "spec.trafficPolicy.portLevelSettings[port 80]", "has no port 80"},
		{"credentialName", okSE + dr + "spec: {host: a.example.com, trafficPolicy: {tls: {mode: SIMPLE, credentialName: x}}}\n", "spec.trafficPolicy.tls.credentialName", "as files"},
		{"uri match", okSE + "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec: {hosts: [a.example.com], http: [{match: [{uri: {prefix: /}}], route: [{destination: {host: a.example.com}}]}]}\n", "spec.http[0].match[0].uri", "subset"},
		{"old version", "apiVersion: networking.istio.io/v1alpha1\nkind: ServiceEntry\nmetadata: {name: e}\n", "apiVersion", "not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("x.yaml", []byte(tc.in))
			errs, ok := err.(Errors)
			if !ok {
				t.Fatalf("err = %v", err)
			}
			for _, e := range errs {
				if e.Field == tc.field && strings.Contains(e.Message, tc.message) {
					return
				}
			}
			t.Fatalf("no error at %s mentioning %q in %v", tc.field, tc.message, err)
		})
	}
}

func TestParseHTTPRoute(t *testing.T) {
	set, err := Parse("r.yaml", []byte(`apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: web}
spec:
  parentRefs: [{name: ingress, namespace: edge}]
  hostnames: [shop.example.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: orders-api, namespace: shipping, port: 80}]
    - backendRefs: [{name: frontend, port: 8080}]
`))
	if err != nil {
		t.Fatal(err)
	}
	r := set.HTTPRoutes[0].Spec
	if r.Gateways[0] != "edge/ingress" || r.Rules[0].Backend != "shipping/orders-api" || r.Rules[0].Paths[0].Value != "/api" ||
		r.Rules[1].Backend != "web/frontend" || r.Rules[1].BackendPort != 8080 || len(r.Rules[1].Paths) != 0 {
		t.Fatalf("route = %+v", r)
	}
	for _, bad := range []string{
		"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: g}], rules: [{backendRefs: [{name: a, port: 80}, {name: b, port: 80}]}]}\n",
		"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\n",
		"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: g}], rules: [{matches: [{path: {type: RegularExpression, value: /x}}], backendRefs: [{name: a, port: 80}]}]}\n",
	} {
		if _, err := Parse("r.yaml", []byte(bad)); err == nil {
			t.Errorf("accepted:\n%s", bad)
		}
	}
}
