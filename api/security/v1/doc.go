// Package v1 holds the Go types of the security.trellis.dev/v1 custom
// resources, PeerAuthentication and AuthorizationPolicy, from which
// scripts/gen-crds generates their CustomResourceDefinitions.
//
// The types give the API server the resources' shape (kubectl explain,
// types, enumerations, printer columns); what a resource means, and
// whether it is valid, is decided by internal/policy, which reads files
// and Kubernetes objects alike and reports problems naming the field.
// Every object keeps the fields its schema does not know
// (x-kubernetes-preserve-unknown-fields): a field Trellis does not support
// yet, such as requestPrincipals, must reach the control plane and be
// refused there, not be pruned by the API server into a rule that allows
// more than its author wrote.
//
// +kubebuilder:object:generate=true
// +groupName=security.trellis.dev
package v1
