// Package meshmetrics names the proxies' metrics and the label values with
// a meaning of their own: one place for what the proxy exports and the
// control plane (and docs/metrics.md) reads.
package meshmetrics

// Metric names.
const (
	Requests        = "trellis_requests_total"
	RequestDuration = "trellis_request_duration_seconds"
	TCPConnections  = "trellis_tcp_connections_total"
	TCPOpen         = "trellis_tcp_open_connections"
	TCPBytes        = "trellis_tcp_bytes_total"
	Refused         = "trellis_refused_connections_total"
	DryRun          = "trellis_dry_run_decisions_total"
	AuthzDecisions  = "trellis_authz_decisions_total"
	// ProcessStart is the process collector's start time, which tells a
	// restarted proxy's counters apart.
	ProcessStart = "process_start_time_seconds"
)

// Edge label values that are not SPIFFE IDs.
const (
	// Unknown is the source of a plaintext caller: it proved no identity.
	Unknown = "unknown"
	// Passthrough is the destination of traffic passed through outside
	// the mesh (neither a mesh service nor a ServiceEntry host).
	Passthrough = "passthrough"
	// Unreachable is the destination of a request no endpoint answered.
	Unreachable = "unreachable"
)

// RefusedStrictPlaintext is the refusal reason of plaintext on a STRICT
// port: a caller without sidecar that STRICT cuts off.
const RefusedStrictPlaintext = "plaintext on a STRICT port"
