package meshcheck

import (
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/push"
)

var now = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

// healthy is a mesh with nothing to report.
func healthy() controlplane.Status {
	return controlplane.Status{
		Resources: controlplane.ResourceStatus{Version: "v1", Directory: "/p"},
		Proxies: []push.ProxyStatus{{Instance: "shipping/orders/o1", Connected: true, InSync: true, CurrentVersion: "a", AckedVersion: "a",
			CertificateIssued: now.Add(-time.Hour), CertificateExpiry: now.Add(23 * time.Hour)}},
		CA: controlplane.CAStatus{
			Roots:        []controlplane.CertStatus{{Subject: "root", NotAfter: now.AddDate(9, 0, 0)}},
			Intermediate: controlplane.CertStatus{Subject: "inter", NotAfter: now.AddDate(0, 6, 0)},
		},
	}
}

func TestEvaluate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		edit    func(*controlplane.Status, *controlplane.Traffic)
		check   string
		level   Level
		message string
	}{
		{"healthy", func(*controlplane.Status, *controlplane.Traffic) {}, "proxies", OK, "1 connected"},
		{"rejected resources", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.Resources.Error = []controlplane.ResourceError{{File: "a.yaml", Field: "spec.mtls.mode", Message: "bad"}}
		}, "configuration", Fail, "a.yaml spec.mtls.mode: bad"},
		{"NACK", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.Proxies[0].InSync, s.Proxies[0].Rejected, s.Proxies[0].RejectedVersion = false, "no", "a"
		}, "proxies", Fail, "rejected"},
		{"behind", func(s *controlplane.Status, _ *controlplane.Traffic) { s.Proxies[0].InSync = false }, "proxies", Warn, "not yet running"},
		{"disconnected", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.Proxies = append(s.Proxies, push.ProxyStatus{Instance: "web/f/f1"})
		}, "proxies", Warn, "web/f/f1"},
		{"root in 20 days", func(s *controlplane.Status, _ *controlplane.Traffic) { s.CA.Roots[0].NotAfter = now.AddDate(0, 0, 20) }, "ca", Warn, "root root expires in 20d"},
		{"root expired", func(s *controlplane.Status, _ *controlplane.Traffic) { s.CA.Roots[0].NotAfter = now.Add(-time.Hour) }, "ca", Fail, "expired"},
		{"intermediate in 29 days", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.CA.Intermediate.NotAfter = now.AddDate(0, 0, 29)
		}, "ca", Warn, "renews itself"},
		{"intermediate in 31 days", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.CA.Intermediate.NotAfter = now.AddDate(0, 0, 31)
		}, "ca", OK, "intermediate inter valid"},
		{"workload certificate not renewed", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.Proxies[0].CertificateIssued, s.Proxies[0].CertificateExpiry = now.Add(-22*time.Hour), now.Add(2*time.Hour)
		}, "certificates", Warn, "has not renewed"},
		{"workload certificate at 80%", func(s *controlplane.Status, _ *controlplane.Traffic) {
			s.Proxies[0].CertificateIssued, s.Proxies[0].CertificateExpiry = now.Add(-19*time.Hour), now.Add(5*time.Hour)
		}, "certificates", OK, "nearest expiry in 5h"},
		{"plaintext caller", func(_ *controlplane.Status, tr *controlplane.Traffic) {
			tr.Edges = []controlplane.EdgeTraffic{{Source: controlplane.NoSidecar, Destination: "payments/ledger"}}
		}, "plaintext", Warn, "(no sidecar) → payments/ledger"},
		{"leaving the mesh is not a plaintext caller", func(_ *controlplane.Status, tr *controlplane.Traffic) {
			tr.Edges = []controlplane.EdgeTraffic{{Source: "a/b", SourceIdentity: "spiffe://cluster.local/ns/a/sa/b", Destination: controlplane.OutsideMesh}}
		}, "plaintext", OK, "no plaintext caller"},
		{"plaintext refused by STRICT", func(_ *controlplane.Status, tr *controlplane.Traffic) {
			tr.Edges = []controlplane.EdgeTraffic{{Source: controlplane.NoSidecar, Destination: "shipping/orders", RefusedPerSecond: 0.5}}
		}, "plaintext", Warn, "shipping/orders refused 0.50 plaintext connections/s under STRICT"},
		{"scrape failure", func(_ *controlplane.Status, tr *controlplane.Traffic) {
			tr.ScrapeErrors = map[string]string{"a/b/c": "refused"}
		}, "metrics", Warn, "a/b/c could not be read: refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, tr := healthy(), &controlplane.Traffic{Window: "5m0s"}
			tc.edit(&st, tr)
			fs := Evaluate(st, tr, now)
			var got []string
			for _, f := range fs {
				got = append(got, string(f.Level)+" "+f.Check+": "+f.Message)
				if f.Check == tc.check && f.Level == tc.level && strings.Contains(f.Message, tc.message) {
					if Failed(fs) != (tc.level == Fail) && tc.level != OK {
						t.Errorf("Failed = %v", Failed(fs))
					}
					return
				}
			}
			t.Fatalf("no %s %s finding with %q in:\n%s", tc.level, tc.check, tc.message, strings.Join(got, "\n"))
		})
	}
	if fs := Evaluate(healthy(), nil, now); Failed(fs) {
		t.Fatalf("a healthy mesh fails: %+v", fs)
	}
}
