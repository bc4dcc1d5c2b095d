// Package meshcheck judges the health of a mesh from the control plane's
// status and traffic views: what `trellis check` reports. Each check gives
// findings that are fine, worth a warning (act soon), or failures (act
// now); the judgement is pure, so its thresholds are table-tested.
package meshcheck

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

// Level grades a finding.
type Level string

const (
	OK   Level = "ok"
	Warn Level = "warning"
	Fail Level = "failure"
)

// Finding is one result of a check.
type Finding struct {
	Check   string `json:"check"`
	Level   Level  `json:"level"`
	Message string `json:"message"`
}

// Thresholds.
const (
	// CAWarning is how long before a root or intermediate expires that
	// it is worth a warning (the intermediate normally rotates itself long
	// before).
	CAWarning = 30 * 24 * time.Hour
	// renewalOverdue is the share of a workload certificate's lifetime
	// after which it should have been renewed (proxies renew at about
	// 70%): a proxy past it could not renew.
	renewalOverdue = 0.85
)

// Evaluate judges the mesh at now. traffic may be nil (not available).
func Evaluate(st controlplane.Status, traffic *controlplane.Traffic, now time.Time) []Finding {
	var out []Finding
	add := func(check string, level Level, format string, args ...any) {
		out = append(out, Finding{Check: check, Level: level, Message: fmt.Sprintf(format, args...)})
	}

	// Configuration.
	if len(st.Resources.Error) > 0 {
		e := st.Resources.Error[0]
		where := e.File
		if e.Field != "" {
			where += " " + e.Field
		}
		add("configuration", Fail, "the last change to %s was rejected (%s: %s); the proxies run the previous configuration", st.Resources.Directory, where, e.Message)
	} else {
		add("configuration", OK, "resources version %s in force", st.Resources.Version)
	}

	// Proxies.
	connected, behind, rejected, away := 0, []string{}, []string{}, []string{}
	for _, p := range st.Proxies {
		switch {
		case !p.Connected:
			away = append(away, p.Instance)
		case p.Rejected != "" && p.RejectedVersion == p.CurrentVersion:
			connected++
			rejected = append(rejected, fmt.Sprintf("%s (%s)", p.Instance, p.Rejected))
		case !p.InSync:
			connected++
			behind = append(behind, p.Instance)
		default:
			connected++
		}
	}
	switch {
	case len(rejected) > 0:
		add("proxies", Fail, "%s rejected the current configuration", strings.Join(rejected, ", "))
	case len(behind) > 0:
		add("proxies", Warn, "%s not yet running the current configuration (trellis status --wait)", strings.Join(behind, ", "))
	case connected == 0:
		add("proxies", Warn, "no proxy is connected")
	default:
		add("proxies", OK, "%d connected, every one running its current configuration", connected)
	}
	if len(away) > 0 {
		add("proxies", Warn, "disconnected, their endpoints kept for the grace period: %s", strings.Join(away, ", "))
	}

	// The CA.
	for _, r := range st.CA.Roots {
		caCert(add, "root "+r.Subject, r, now, "rotate it: trellis ca rotate-root prepare")
	}
	caCert(add, "intermediate "+st.CA.Intermediate.Subject, st.CA.Intermediate, now,
		"it renews itself at 2/3 of its lifetime while the control plane runs: check the control plane's log")

	// Workload certificates.
	var nearest *controlplane.CertStatus
	nearestOf := ""
	for _, p := range st.Proxies {
		if !p.Connected || p.CertificateExpiry.IsZero() {
			continue
		}
		left := p.CertificateExpiry.Sub(now)
		if left <= 0 {
			add("certificates", Fail, "%s holds an expired certificate (since %s)", p.Instance, p.CertificateExpiry.Format(time.RFC3339))
			continue
		}
		if !p.CertificateIssued.IsZero() {
			life := p.CertificateExpiry.Sub(p.CertificateIssued)
			if life > 0 && now.Sub(p.CertificateIssued) > time.Duration(renewalOverdue*float64(life)) {
				add("certificates", Warn, "%s has not renewed its certificate, which expires in %s: is the identity service reachable from it?", p.Instance, roundDuration(left))
			}
		}
		if nearest == nil || p.CertificateExpiry.Before(nearest.NotAfter) {
			nearest, nearestOf = &controlplane.CertStatus{NotAfter: p.CertificateExpiry}, p.Instance
		}
	}
	if nearest != nil {
		add("certificates", OK, "workload certificates valid; the nearest expiry in %s (%s)", roundDuration(nearest.NotAfter.Sub(now)), nearestOf)
	}

	// Plaintext traffic.
	if traffic != nil {
		plain := 0
		for _, e := range traffic.Edges {
			if e.MTLS || e.SourceIdentity != "" {
				continue // mTLS, or leaving the mesh from a meshed caller
			}
			plain++
			if e.RefusedPerSecond > 0 {
				add("plaintext", Warn, "%s refused %.2f plaintext connections/s under STRICT over the last %s: a caller without sidecar is cut off", e.Destination, e.RefusedPerSecond, traffic.Window)
				continue
			}
			add("plaintext", Warn, "%s → %s in plaintext over the last %s: STRICT would refuse it; mesh the caller first", e.Source, e.Destination, traffic.Window)
		}
		if plain == 0 {
			add("plaintext", OK, "no plaintext caller of a meshed workload over the last %s", traffic.Window)
		}
		instances := make([]string, 0, len(traffic.ScrapeErrors))
		for k := range traffic.ScrapeErrors {
			instances = append(instances, k)
		}
		sort.Strings(instances)
		for _, k := range instances {
			add("metrics", Warn, "the metrics of %s could not be read: %s", k, traffic.ScrapeErrors[k])
		}
	}
	return out
}

func caCert(add func(string, Level, string, ...any), what string, c controlplane.CertStatus, now time.Time, fix string) {
	left := c.NotAfter.Sub(now)
	switch {
	case left <= 0:
		add("ca", Fail, "%s expired %s ago: no certificate it signed is valid", what, roundDuration(-left))
	case left < CAWarning:
		add("ca", Warn, "%s expires in %s (%s): %s", what, roundDuration(left), c.NotAfter.Format(time.DateOnly), fix)
	default:
		add("ca", OK, "%s valid until %s", what, c.NotAfter.Format(time.DateOnly))
	}
}

// roundDuration prints d to a useful precision: days, hours or minutes.
func roundDuration(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	case d >= time.Minute:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	}
	return d.Round(time.Second).String()
}

// Failed reports whether any finding is a failure.
func Failed(fs []Finding) bool {
	for _, f := range fs {
		if f.Level == Fail {
			return true
		}
	}
	return false
}
