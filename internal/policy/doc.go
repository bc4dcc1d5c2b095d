// Package policy defines the resources of Trellis' watched configuration,
// in the shape of Istio's, and loads them from YAML files strictly: the
// security resources PeerAuthentication and AuthorizationPolicy, and the
// networking resources for destinations outside the mesh, ServiceEntry,
// DestinationRule (the TLS a sidecar originates) and VirtualService (the
// subset that sends one port of a ServiceEntry host to another).
//
// Loading happens in stages: YAML is split into documents and decoded into
// a generic tree; the tree is decoded into typed resources, where an unknown
// field or a wrong type is an error; defaults are applied (an omitted
// namespace is "default", an omitted action is ALLOW, an omitted mode is
// UNSET); Validate checks values (modes, actions, patterns, ports, CIDRs,
// field combinations Istio rejects). Every problem names the file, the
// document, the field path and what is allowed, and a directory with any
// problem is rejected whole, so callers that watch files keep their previous
// valid Set.
//
// apiVersion security.trellis.dev/v1 is canonical; security.istio.io/v1 and
// v1beta1 are aliases so Istio examples load unchanged, and so is the
// istio.io/dry-run annotation for trellis.dev/dry-run; likewise
// networking.trellis.dev/v1 with networking.istio.io v1, v1beta1 and
// v1alpha3. Documents of other kinds in the same files are skipped and
// listed in Set.Skipped.
//
// Evaluation lives in the subpackages: match (value and path patterns),
// mtls (which PeerAuthentication mode applies, including how conflicting
// policies are ordered when files carry no metadata.creationTimestamp: a
// policy without one counts as oldest, and ties go to the lexically first
// namespace/name), authz (compiled authorization) and decision (both,
// explained).
package policy
