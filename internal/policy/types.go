package policy

import (
	"time"
)

// API groups, versions and names of the security resources.
const (
	// Group is Trellis' own API group for security resources.
	Group = "security.trellis.dev"
	// IstioGroup is accepted as an alias of Group so that Istio YAML works
	// unchanged.
	IstioGroup = "security.istio.io"
	// APIVersion is the canonical apiVersion of Trellis security resources.
	APIVersion = Group + "/v1"

	KindPeerAuthentication  = "PeerAuthentication"
	KindAuthorizationPolicy = "AuthorizationPolicy"

	// DefaultRootNamespace is the mesh root namespace: a PeerAuthentication
	// without selector there is mesh-wide, and an AuthorizationPolicy there
	// applies to workloads of every namespace.
	DefaultRootNamespace = "trellis-system"
	// DefaultNamespace is the namespace of a resource whose metadata names
	// none, as kubectl does without a context namespace.
	DefaultNamespace = "default"

	// DryRunAnnotation set to "true" makes an AuthorizationPolicy evaluated
	// and reported but not enforced.
	DryRunAnnotation = "trellis.dev/dry-run"
	// IstioDryRunAnnotation is accepted as an alias of DryRunAnnotation.
	IstioDryRunAnnotation = "istio.io/dry-run"
)

// Location is where a resource was read from.
type Location struct {
	File     string
	Document int // 1-based index of the YAML document in File
	Line     int // line of File where that document starts
}

// Metadata is the subset of Kubernetes object metadata that policies use.
type Metadata struct {
	Name        string
	Namespace   string
	Labels      map[string]string
	Annotations map[string]string
	// CreationTimestamp is zero when the document carries none, which is
	// usual for files; see package mtls for how ties are then broken.
	CreationTimestamp time.Time
}

// Ref returns "namespace/name".
func (m Metadata) Ref() string { return m.Namespace + "/" + m.Name }

// Selector selects workloads by labels within the policy's scope.
type Selector struct {
	MatchLabels map[string]string
}

// Matches reports whether every label of the selector is on the workload.
// A nil or empty selector matches every workload.
func (s *Selector) Matches(labels map[string]string) bool {
	if s == nil {
		return true
	}
	for k, v := range s.MatchLabels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Empty reports whether the selector selects every workload: Istio treats a
// selector without labels as no selector.
func (s *Selector) Empty() bool { return s == nil || len(s.MatchLabels) == 0 }

// Workload is the destination a policy is evaluated for.
type Workload struct {
	Namespace string
	Name      string
	Labels    map[string]string
}

// MTLSMode is a PeerAuthentication mutual TLS mode.
type MTLSMode string

// The mutual TLS modes. An omitted mode is ModeUnset.
const (
	ModeUnset      MTLSMode = "UNSET"
	ModeDisable    MTLSMode = "DISABLE"
	ModePermissive MTLSMode = "PERMISSIVE"
	ModeStrict     MTLSMode = "STRICT"
)

// PeerAuthentication says whether a workload accepts plaintext, mutual TLS
// or both.
type PeerAuthentication struct {
	APIVersion string
	Metadata   Metadata
	Spec       PeerAuthenticationSpec
	Location   Location
}

// PeerAuthenticationSpec is the spec of a PeerAuthentication.
type PeerAuthenticationSpec struct {
	Selector *Selector
	// MTLS is nil when the spec has no mtls field, which is the same as
	// mode UNSET.
	MTLS *MTLS
	// PortLevelMTLS overrides the mode for workload ports; keys are the
	// workload's (container) ports.
	PortLevelMTLS map[uint32]MTLS
}

// MTLS holds a mode; an empty Mode means UNSET.
type MTLS struct {
	Mode MTLSMode
}

// Effective returns the mode, with "" reported as ModeUnset.
func (m *MTLS) Effective() MTLSMode {
	if m == nil || m.Mode == "" {
		return ModeUnset
	}
	return m.Mode
}

// Action is what an AuthorizationPolicy does when one of its rules matches.
type Action string

// The supported actions; an omitted action is ActionAllow. CUSTOM is parsed
// so that it can be rejected with a clear message.
const (
	ActionAllow  Action = "ALLOW"
	ActionDeny   Action = "DENY"
	ActionAudit  Action = "AUDIT"
	ActionCustom Action = "CUSTOM"
)

// AuthorizationPolicy allows, denies or audits requests to workloads.
type AuthorizationPolicy struct {
	APIVersion string
	Metadata   Metadata
	Spec       AuthorizationPolicySpec
	Location   Location
}

// DryRun reports whether the policy is only evaluated and reported, not
// enforced.
func (p *AuthorizationPolicy) DryRun() bool {
	return p.Metadata.Annotations[DryRunAnnotation] == "true" ||
		p.Metadata.Annotations[IstioDryRunAnnotation] == "true"
}

// AuthorizationPolicySpec is the spec of an AuthorizationPolicy.
type AuthorizationPolicySpec struct {
	Selector *Selector
	// Action is "" when omitted, which means ALLOW; see EffectiveAction.
	Action Action
	Rules  []Rule
}

// EffectiveAction returns the action with the ALLOW default applied.
func (s *AuthorizationPolicySpec) EffectiveAction() Action {
	if s.Action == "" {
		return ActionAllow
	}
	return s.Action
}

// Rule matches a request when any From, any To and every When match.
type Rule struct {
	From []From
	To   []To
	When []Condition
}

// From holds one source; Source is nil only in invalid input.
type From struct {
	Source *Source
}

// To holds one operation; Operation is nil only in invalid input.
type To struct {
	Operation *Operation
}

// Source describes the peer. Fields AND, values of a field OR.
type Source struct {
	Principals    []string
	NotPrincipals []string
	Namespaces    []string
	NotNamespaces []string
	IPBlocks      []string
	NotIPBlocks   []string
}

// Operation describes the request. Fields AND, values of a field OR.
type Operation struct {
	Hosts      []string
	NotHosts   []string
	Ports      []string
	NotPorts   []string
	Methods    []string
	NotMethods []string
	Paths      []string
	NotPaths   []string
}

// Condition is a "when" entry: the attribute Key must have one of Values
// (if any) and none of NotValues.
type Condition struct {
	Key       string
	Values    []string
	NotValues []string
}
