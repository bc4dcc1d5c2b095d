// Package v1 holds the Go types of the networking.trellis.dev/v1 custom
// resources, ServiceEntry, DestinationRule and VirtualService, from which
// scripts/gen-crds generates their CustomResourceDefinitions.
//
// As in security.trellis.dev (see its package comment), the schema gives
// the shape and internal/policy decides the meaning; unknown fields are
// kept so that the control plane refuses what it does not support rather
// than the API server dropping it.
//
// +kubebuilder:object:generate=true
// +groupName=networking.trellis.dev
package v1
