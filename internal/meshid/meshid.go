// Package meshid maps workloads to their SPIFFE IDs and back. Every part of
// Trellis that names a workload's identity goes through here, so the shape
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> is defined once.
package meshid

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// DefaultTrustDomain is the trust domain used when none is configured.
	DefaultTrustDomain = "cluster.local"
	// RootNamespace is the mesh root namespace: mesh-wide policy lives here
	// and so does the control plane's own identity.
	RootNamespace = "trellis-system"
	// ControlPlaneServiceAccount is the service account the control plane's
	// serving certificate is issued for.
	ControlPlaneServiceAccount = "trellis-control-plane"
)

// ErrNotWorkload is returned by Parse for SPIFFE IDs that do not have the
// /ns/<namespace>/sa/<service-account> shape.
var ErrNotWorkload = errors.New("not a workload SPIFFE ID (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")

// Workload returns the SPIFFE ID of a workload running as serviceAccount in
// namespace.
func Workload(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if err := ValidateName("namespace", namespace); err != nil {
		return spiffeid.ID{}, err
	}
	if err := ValidateName("service account", serviceAccount); err != nil {
		return spiffeid.ID{}, err
	}
	return spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
}

// ControlPlane returns the SPIFFE ID the control plane serves with.
func ControlPlane(td spiffeid.TrustDomain) spiffeid.ID {
	id, err := Workload(td, RootNamespace, ControlPlaneServiceAccount)
	if err != nil {
		panic(err) // constants above are valid names
	}
	return id
}

// Parse returns the namespace and service account of a workload SPIFFE ID.
func Parse(id spiffeid.ID) (namespace, serviceAccount string, err error) {
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return "", "", fmt.Errorf("%q: %w", id, ErrNotWorkload)
	}
	if ValidateName("namespace", parts[1]) != nil || ValidateName("service account", parts[3]) != nil {
		return "", "", fmt.Errorf("%q: %w", id, ErrNotWorkload)
	}
	return parts[1], parts[3], nil
}

// ValidateName checks that name is a Kubernetes DNS-1123 label-like name
// (lower-case letters, digits, '-' and '.', at most 253 characters, starting
// and ending alphanumeric), which is what namespaces and service accounts are.
func ValidateName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s is empty: give a name such as \"default\"", what)
	}
	if len(name) > 253 {
		return fmt.Errorf("%s %q is longer than 253 characters", what, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if alnum {
			continue
		}
		if (c == '-' || c == '.') && i > 0 && i < len(name)-1 {
			continue
		}
		return fmt.Errorf("%s %q is not a valid name: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit", what, name)
	}
	return nil
}

// NamespaceOf returns the namespace a principal names, as Istio derives
// source.namespace: the segment after "ns" in a principal written without
// "spiffe://" (cluster.local/ns/shipping/sa/orders-api), or "" when it has
// none. Unlike Parse it does not require the full workload shape.
func NamespaceOf(principal string) string {
	parts := strings.Split(principal, "/")
	if len(parts) >= 3 && parts[1] == "ns" {
		return parts[2]
	}
	return ""
}

// ServiceHostNames returns the names a service "name.namespace" is called
// by: that, and Kubernetes' name.namespace.svc and
// name.namespace.svc.cluster.local. The local runtime resolves them to the
// service's virtual IP; a sidecar used as an HTTP proxy routes by them.
func ServiceHostNames(service string) []string {
	return []string{service, service + ".svc", service + ".svc.cluster.local"}
}
