package controlplane

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/meshmetrics"
	"github.com/trellis-mesh/trellis/internal/telemetry"
)

// Traffic is what the mesh's proxies measured over a window: golden
// metrics per workload, and every edge with whether it is mutual TLS.
type Traffic struct {
	Window    string            `json:"window"`
	At        time.Time         `json:"at"`
	Workloads []WorkloadTraffic `json:"workloads"`
	Edges     []EdgeTraffic     `json:"edges"`
	// ScrapeErrors says, by proxy instance, why its metrics could not be
	// read at the last attempt: its figures are missing or stale.
	ScrapeErrors map[string]string `json:"scrapeErrors,omitempty"`
}

// WorkloadTraffic is a workload's inbound traffic: what its proxies
// answered (meshed workloads) or nothing (a workload without sidecar,
// whose callers' edges still show it).
type WorkloadTraffic struct {
	Workload string `json:"workload"` // namespace/name
	Meshed   bool   `json:"meshed"`
	// Proxies is how many of its proxies are connected.
	Proxies int `json:"proxies"`
	telemetry.Golden
	// Refused counts, by reason, connections refused before any request,
	// per second: "plaintext on a STRICT port" is a caller STRICT cuts off.
	Refused map[string]float64 `json:"refusedPerSecond,omitempty"`
	// Rules count authorization's decisions by policy rule over the
	// window, dry-run policies' would-be decisions apart.
	Rules []telemetry.RuleDecisions `json:"rules,omitempty"`
}

// EdgeTraffic is the traffic from a caller to a callee.
type EdgeTraffic struct {
	// Source is the calling workload (namespace/name) when known, else
	// its identity; "(no sidecar)" for a plaintext caller.
	Source              string `json:"source"`
	SourceIdentity      string `json:"sourceIdentity,omitempty"`
	Destination         string `json:"destination"`
	DestinationIdentity string `json:"destinationIdentity,omitempty"`
	MTLS                bool   `json:"mtls"`
	// Plaintext says why an edge is not mutual TLS.
	Plaintext string `json:"plaintext,omitempty"`
	// MeasuredBy is the proxy that counted it: the callee's ("inbound")
	// or, for destinations outside the mesh, the caller's ("outbound").
	MeasuredBy string `json:"measuredBy"`
	// RefusedPerSecond counts plaintext connections the callee's STRICT
	// port refused: a caller the mesh already cuts off.
	RefusedPerSecond float64 `json:"refusedPerSecond,omitempty"`
	telemetry.Golden
}

// Names for the ends of edges that are not workloads.
const (
	NoSidecar     = "(no sidecar)"
	OutsideMesh   = "(outside the mesh)"
	trafficMaxAge = time.Second // a query scrapes unless the last scrape is this recent
)

// MaxTrafficWindow is the longest window the traffic view answers for.
const MaxTrafficWindow = 15 * time.Minute

func newCollector(cp *ControlPlane) *telemetry.Collector {
	return telemetry.New(telemetry.Config{
		Targets: func() []telemetry.Target {
			var out []telemetry.Target
			for _, in := range cp.registry.Snapshot().Instances {
				if in.DisconnectedAt.IsZero() && in.Stats != "" {
					out = append(out, telemetry.Target{Instance: in.Key(), Workload: in.Namespace + "/" + in.Workload, Identity: in.Identity, Addr: in.Stats})
				}
			}
			return out
		},
		Retain: MaxTrafficWindow,
		Log:    cp.log.With("component", "telemetry"),
	})
}

// Traffic returns the traffic of the last window, scraping the proxies
// first unless they were scraped a moment ago.
func (cp *ControlPlane) Traffic(ctx context.Context, window time.Duration) Traffic {
	cp.telemetry.Fresh(ctx, trafficMaxAge)
	now := time.Now()
	workloads, edges := cp.telemetry.Window(now, window)
	snap := cp.registry.Snapshot()
	out := Traffic{Window: window.String(), At: now, ScrapeErrors: cp.telemetry.Failures()}

	// Identities name workloads by namespace and service account; an
	// identity shared by several workloads stays an identity.
	byIdentity := map[string][]string{}
	td := spiffeid.RequireTrustDomainFromString(cp.cfg.TrustDomain)
	for _, w := range snap.Declarations.Workloads {
		if id, err := meshid.Workload(td, w.Namespace, w.ServiceAccount); err == nil {
			byIdentity[id.String()] = append(byIdentity[id.String()], w.Ref())
		}
	}
	name := func(workload, identity, otherwise string) string {
		switch {
		case workload != "":
			return workload
		case len(byIdentity[identity]) == 1:
			return byIdentity[identity][0]
		case identity == meshmetrics.Unknown:
			return NoSidecar
		case identity == meshmetrics.Passthrough:
			return OutsideMesh
		case identity != "" && !strings.HasPrefix(identity, "spiffe://"):
			return identity + " " + OutsideMesh // a ServiceEntry host
		case identity != "":
			return identity
		}
		return otherwise
	}

	connected := map[string]int{}
	for _, in := range snap.Instances {
		if in.DisconnectedAt.IsZero() {
			connected[in.Namespace+"/"+in.Workload]++
		}
	}
	measured := map[string]telemetry.WorkloadTraffic{}
	for _, w := range workloads {
		measured[w.Workload] = w
	}
	for _, w := range snap.Declarations.Workloads {
		out.Workloads = append(out.Workloads, WorkloadTraffic{Workload: w.Ref(), Meshed: true, Proxies: connected[w.Ref()], Golden: measured[w.Ref()].Golden, Refused: measured[w.Ref()].Refused, Rules: measured[w.Ref()].Rules})
	}
	for _, w := range cp.cfg.UnmeshedWorkloads {
		out.Workloads = append(out.Workloads, WorkloadTraffic{Workload: w.Namespace + "/" + w.Name})
	}
	slices.SortFunc(out.Workloads, func(a, b WorkloadTraffic) int { return cmp.Compare(a.Workload, b.Workload) })

	for _, e := range edges {
		et := EdgeTraffic{
			Source: name(e.SourceWorkload, e.SourceIdentity, ""), Destination: name(e.DestinationWorkload, e.DestinationIdentity, ""),
			SourceIdentity: e.SourceIdentity, DestinationIdentity: e.DestinationIdentity,
			MTLS: e.MTLS, MeasuredBy: e.MeasuredBy, Golden: e.Golden,
		}
		if et.SourceIdentity == meshmetrics.Unknown {
			et.SourceIdentity = ""
		}
		if et.DestinationIdentity == meshmetrics.Passthrough {
			et.DestinationIdentity = ""
		}
		switch {
		case e.MTLS:
		case e.SourceIdentity == meshmetrics.Unknown:
			et.Plaintext = "the caller has no sidecar (PERMISSIVE let it in; STRICT would refuse it)"
		case !strings.HasPrefix(e.DestinationIdentity, "spiffe://"):
			et.Plaintext = "the destination is outside the mesh (originate TLS to it with a DestinationRule)"
		default:
			et.Plaintext = "not mutual TLS"
		}
		out.Edges = append(out.Edges, et)
	}
	// Plaintext the callee refused never became a request or a relayed
	// connection; it is an edge all the same, and the one to look at.
	for _, w := range out.Workloads {
		if r := w.Refused[meshmetrics.RefusedStrictPlaintext]; r > 0 {
			out.Edges = append(out.Edges, EdgeTraffic{Source: NoSidecar, Destination: w.Workload, MeasuredBy: "inbound", RefusedPerSecond: r,
				Plaintext: "refused: the port is STRICT and the caller has no sidecar"})
		}
	}
	return out
}

// parseWindow reads the window query parameter: 1m unless given, at most
// MaxTrafficWindow.
func parseWindow(r *http.Request) (time.Duration, error) {
	s := r.URL.Query().Get("window")
	if s == "" {
		return time.Minute, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 || d > MaxTrafficWindow {
		return 0, fmt.Errorf("window %q: give a duration from 1s to %s, such as 1m", s, MaxTrafficWindow)
	}
	return d, nil
}
