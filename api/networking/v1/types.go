package v1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	securityv1 "github.com/trellis-mesh/trellis/api/security/v1"
)

// ServiceEntry adds a destination outside the mesh (MESH_EXTERNAL) to the
// mesh's registry: its host names, ports and, for STATIC resolution, its
// addresses. With outboundTrafficPolicy REGISTRY_ONLY, only mesh services
// and ServiceEntry hosts can be reached.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=se,categories=trellis
// +kubebuilder:printcolumn:name="Hosts",type=string,JSONPath=`.spec.hosts`
// +kubebuilder:printcolumn:name="Location",type=string,JSONPath=`.spec.location`
// +kubebuilder:printcolumn:name="Resolution",type=string,JSONPath=`.spec.resolution`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ServiceEntry struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ServiceEntrySpec  `json:"spec,omitempty"`
	Status securityv1.Status `json:"status,omitempty"`
}

// ServiceEntrySpec describes an external destination.
//
// +kubebuilder:pruning:PreserveUnknownFields
type ServiceEntrySpec struct {
	Hosts []string `json:"hosts"`
	// +optional
	Ports []ServiceEntryPort `json:"ports,omitempty"`
	// +kubebuilder:validation:Enum=MESH_EXTERNAL;MESH_INTERNAL
	// +optional
	Location string `json:"location,omitempty"`
	// +kubebuilder:validation:Enum=NONE;STATIC;DNS;DNS_ROUND_ROBIN
	// +optional
	Resolution string `json:"resolution,omitempty"`
	// +optional
	Endpoints []ServiceEntryEndpoint `json:"endpoints,omitempty"`
}

// ServiceEntryPort is a port of the external destination.
//
// +kubebuilder:pruning:PreserveUnknownFields
type ServiceEntryPort struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Number uint32 `json:"number"`
	// +optional
	Name string `json:"name,omitempty"`
	// Protocol: HTTP, HTTPS, HTTP2, GRPC, TLS or TCP.
	// +optional
	Protocol string `json:"protocol,omitempty"`
	// +optional
	TargetPort uint32 `json:"targetPort,omitempty"`
}

// ServiceEntryEndpoint is one address of a STATIC ServiceEntry.
//
// +kubebuilder:pruning:PreserveUnknownFields
type ServiceEntryEndpoint struct {
	Address string `json:"address"`
	// Ports maps port names to the endpoint's port numbers.
	// +optional
	Ports map[string]uint32 `json:"ports,omitempty"`
	// +optional
	Labels map[string]string `json:"labels,omitempty"`
}

// ServiceEntryList is a list of ServiceEntries.
//
// +kubebuilder:object:root=true
type ServiceEntryList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ServiceEntry `json:"items"`
}

// DestinationRule says how sidecars connect to a host: with TLS
// originated for the application (SIMPLE, MUTUAL with a client
// certificate), mesh mTLS (ISTIO_MUTUAL) or none, for all ports or per port.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=dr,categories=trellis
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.spec.host`
// +kubebuilder:printcolumn:name="TLS",type=string,JSONPath=`.spec.trafficPolicy.tls.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type DestinationRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   DestinationRuleSpec `json:"spec,omitempty"`
	Status securityv1.Status   `json:"status,omitempty"`
}

// DestinationRuleSpec is the host and its traffic policy.
//
// +kubebuilder:pruning:PreserveUnknownFields
type DestinationRuleSpec struct {
	Host string `json:"host"`
	// +optional
	TrafficPolicy *TrafficPolicy `json:"trafficPolicy,omitempty"`
}

// TrafficPolicy holds the TLS settings.
//
// +kubebuilder:pruning:PreserveUnknownFields
type TrafficPolicy struct {
	// +optional
	TLS *ClientTLS `json:"tls,omitempty"`
	// +optional
	PortLevelSettings []PortTrafficPolicy `json:"portLevelSettings,omitempty"`
}

// PortTrafficPolicy is the TLS settings of one port.
//
// +kubebuilder:pruning:PreserveUnknownFields
type PortTrafficPolicy struct {
	Port PortSelector `json:"port"`
	// +optional
	TLS *ClientTLS `json:"tls,omitempty"`
}

// PortSelector names a port by number.
//
// +kubebuilder:pruning:PreserveUnknownFields
type PortSelector struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Number uint32 `json:"number"`
}

// ClientTLS is the TLS a sidecar originates. The file names are paths in
// the sidecar's file system.
//
// +kubebuilder:pruning:PreserveUnknownFields
type ClientTLS struct {
	// +kubebuilder:validation:Enum=DISABLE;SIMPLE;MUTUAL;ISTIO_MUTUAL
	// +optional
	Mode string `json:"mode,omitempty"`
	// +optional
	ClientCertificate string `json:"clientCertificate,omitempty"`
	// +optional
	PrivateKey string `json:"privateKey,omitempty"`
	// +optional
	CACertificates string `json:"caCertificates,omitempty"`
	// +optional
	SNI string `json:"sni,omitempty"`
	// +optional
	SubjectAltNames []string `json:"subjectAltNames,omitempty"`
	// +optional
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
}

// DestinationRuleList is a list of DestinationRules.
//
// +kubebuilder:object:root=true
type DestinationRuleList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []DestinationRule `json:"items"`
}

// VirtualService, in the subset Trellis serves, sends a ServiceEntry port
// to another port: the application calls http://host:80 and its sidecar
// connects to host:443 with the TLS a DestinationRule gives.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vs,categories=trellis
// +kubebuilder:printcolumn:name="Hosts",type=string,JSONPath=`.spec.hosts`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VirtualService struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   VirtualServiceSpec `json:"spec,omitempty"`
	Status securityv1.Status  `json:"status,omitempty"`
}

// VirtualServiceSpec is the hosts and their port routes.
//
// +kubebuilder:pruning:PreserveUnknownFields
type VirtualServiceSpec struct {
	Hosts []string `json:"hosts"`
	// +optional
	HTTP []HTTPRoute `json:"http,omitempty"`
}

// HTTPRoute sends the requests its match selects to one destination.
//
// +kubebuilder:pruning:PreserveUnknownFields
type HTTPRoute struct {
	// +optional
	Name string `json:"name,omitempty"`
	// +optional
	Match []HTTPMatchRequest `json:"match,omitempty"`
	// +optional
	Route []HTTPRouteDestination `json:"route,omitempty"`
}

// HTTPMatchRequest matches by the port the application called.
//
// +kubebuilder:pruning:PreserveUnknownFields
type HTTPMatchRequest struct {
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	Port uint32 `json:"port,omitempty"`
}

// HTTPRouteDestination is where matched requests go.
//
// +kubebuilder:pruning:PreserveUnknownFields
type HTTPRouteDestination struct {
	Destination Destination `json:"destination"`
}

// Destination is a host and port.
//
// +kubebuilder:pruning:PreserveUnknownFields
type Destination struct {
	Host string `json:"host"`
	// +optional
	Port *PortSelector `json:"port,omitempty"`
}

// VirtualServiceList is a list of VirtualServices.
//
// +kubebuilder:object:root=true
type VirtualServiceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualService `json:"items"`
}
