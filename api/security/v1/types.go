package v1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// PeerAuthentication sets the mutual TLS mode of the workloads it selects:
// mesh-wide in trellis-system, namespace-wide without a selector, or for
// the workloads its selector matches, and per port; the narrowest wins.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=pa,categories=trellis
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mtls.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type PeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   PeerAuthenticationSpec `json:"spec,omitempty"`
	Status Status                 `json:"status,omitempty"`
}

// PeerAuthenticationSpec is what a PeerAuthentication requires of callers.
//
// +kubebuilder:pruning:PreserveUnknownFields
type PeerAuthenticationSpec struct {
	// Selector picks the workloads of the namespace the policy applies
	// to; without one it applies to the whole namespace (or the mesh, in
	// trellis-system).
	// +optional
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// MTLS is the mode for the selected workloads' ports.
	// +optional
	MTLS *MTLS `json:"mtls,omitempty"`
	// PortLevelMTLS overrides the mode per workload port (the key is the
	// port number); it needs a selector.
	// +optional
	PortLevelMTLS map[string]MTLS `json:"portLevelMtls,omitempty"`
}

// MTLS is a mutual TLS mode.
//
// +kubebuilder:pruning:PreserveUnknownFields
type MTLS struct {
	// Mode: STRICT refuses plaintext, PERMISSIVE accepts both, DISABLE
	// accepts plaintext only, UNSET inherits from the wider scope.
	// +kubebuilder:validation:Enum=UNSET;DISABLE;PERMISSIVE;STRICT
	// +optional
	Mode string `json:"mode,omitempty"`
}

// WorkloadSelector selects workloads by their labels.
//
// +kubebuilder:pruning:PreserveUnknownFields
type WorkloadSelector struct {
	// +optional
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// PeerAuthenticationList is a list of PeerAuthentications.
//
// +kubebuilder:object:root=true
type PeerAuthenticationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []PeerAuthentication `json:"items"`
}

// AuthorizationPolicy decides which callers may reach the workloads it
// selects, down to HTTP method and path: DENY policies first, then ALLOW
// ones (a workload with an ALLOW policy refuses what none allows).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=ap,categories=trellis
// +kubebuilder:printcolumn:name="Action",type=string,JSONPath=`.spec.action`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   AuthorizationPolicySpec `json:"spec,omitempty"`
	Status Status                  `json:"status,omitempty"`
}

// AuthorizationPolicySpec is a policy's selector, action and rules.
//
// +kubebuilder:pruning:PreserveUnknownFields
type AuthorizationPolicySpec struct {
	// +optional
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// Action taken when a rule matches; ALLOW when empty.
	// +kubebuilder:validation:Enum=ALLOW;DENY;AUDIT;CUSTOM
	// +optional
	Action string `json:"action,omitempty"`
	// Rules: a request matches the policy when it matches one rule; an
	// ALLOW policy without rules allows nothing, rules: [{}] everything.
	// +optional
	Rules []Rule `json:"rules,omitempty"`
}

// Rule matches a request when every one of its non-empty parts does.
//
// +kubebuilder:pruning:PreserveUnknownFields
type Rule struct {
	// +optional
	From []RuleFrom `json:"from,omitempty"`
	// +optional
	To []RuleTo `json:"to,omitempty"`
	// +optional
	When []Condition `json:"when,omitempty"`
}

// RuleFrom names the callers a rule matches.
//
// +kubebuilder:pruning:PreserveUnknownFields
type RuleFrom struct {
	// +optional
	Source *Source `json:"source,omitempty"`
}

// Source is the caller: its SPIFFE principal, namespace or address.
//
// +kubebuilder:pruning:PreserveUnknownFields
type Source struct {
	// Principals such as cluster.local/ns/shipping/sa/checkout.
	// +optional
	Principals []string `json:"principals,omitempty"`
	// +optional
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	// +optional
	Namespaces []string `json:"namespaces,omitempty"`
	// +optional
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// +optional
	IPBlocks []string `json:"ipBlocks,omitempty"`
	// +optional
	NotIPBlocks []string `json:"notIpBlocks,omitempty"`
}

// RuleTo names the operations a rule matches.
//
// +kubebuilder:pruning:PreserveUnknownFields
type RuleTo struct {
	// +optional
	Operation *Operation `json:"operation,omitempty"`
}

// Operation is what the caller asks for.
//
// +kubebuilder:pruning:PreserveUnknownFields
type Operation struct {
	// +optional
	Hosts []string `json:"hosts,omitempty"`
	// +optional
	NotHosts []string `json:"notHosts,omitempty"`
	// +optional
	Ports []string `json:"ports,omitempty"`
	// +optional
	NotPorts []string `json:"notPorts,omitempty"`
	// +optional
	Methods []string `json:"methods,omitempty"`
	// +optional
	NotMethods []string `json:"notMethods,omitempty"`
	// Paths: exact, prefix (/api/*), suffix (*.js) or * patterns.
	// +optional
	Paths []string `json:"paths,omitempty"`
	// +optional
	NotPaths []string `json:"notPaths,omitempty"`
}

// Condition matches a request attribute such as source.principal,
// request.headers[x] or destination.port.
//
// +kubebuilder:pruning:PreserveUnknownFields
type Condition struct {
	Key string `json:"key"`
	// +optional
	Values []string `json:"values,omitempty"`
	// +optional
	NotValues []string `json:"notValues,omitempty"`
}

// AuthorizationPolicyList is a list of AuthorizationPolicies.
//
// +kubebuilder:object:root=true
type AuthorizationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AuthorizationPolicy `json:"items"`
}

// Status is what the control plane found of a resource: its condition
// Accepted is False, with the field and the fix in its message, when the
// resource is invalid and not in force.
type Status struct {
	// ObservedGeneration is the generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
