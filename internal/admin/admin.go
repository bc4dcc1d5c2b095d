// Package admin serves the proxy's admin endpoints on a loopback port:
// liveness, readiness, Prometheus metrics, the identity and configuration
// the proxy runs with, and a graceful shutdown for Jobs. Nothing else on
// this port changes the proxy's behaviour.
package admin

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"time"
)

// Identity is the certificate part of /config.
type Identity struct {
	SPIFFEID        string    `json:"spiffeId"`
	Serial          string    `json:"serial"`
	NotBefore       time.Time `json:"notBefore"`
	NotAfter        time.Time `json:"notAfter"`
	SecondsToExpiry float64   `json:"secondsToExpiry"`
	TrustBundle     []string  `json:"trustBundleSha256"`
}

// State is what /config reports; Identity is nil until the proxy holds a
// certificate.
type State struct {
	Identity *Identity `json:"identity"`
	// Source says where the identity comes from: "identity-service ADDR" or
	// "static DIR".
	Source string `json:"source"`
	// PolicyVersion identifies the policies in force.
	PolicyVersion string `json:"policyVersion,omitempty"`
	// ConfigVersion is the control plane configuration version applied,
	// when the proxy follows a control plane.
	ConfigVersion string `json:"configVersion,omitempty"`
	// Config is the proxy configuration in force, when it has one.
	Config any `json:"config,omitempty"`
}

// Endpoints are what the admin mux serves; nil fields are not served.
type Endpoints struct {
	// Ready reports whether the proxy can serve traffic.
	Ready func() bool
	// State returns what /config shows.
	State func() State
	// Metrics serves /metrics.
	Metrics http.Handler
	// Shutdown starts a graceful shutdown (POST /shutdown).
	Shutdown func()
	// AppHealth serves the application's probes under /app-health/ (for
	// the kubelet, on the stats listener too).
	AppHealth http.Handler
	// Profiling serves Go's pprof endpoints under /debug/pprof/, for
	// finding where a proxy spends its time; off unless asked for.
	Profiling bool
}

// Handler returns the admin mux.
func Handler(e Endpoints) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("live\n"))
	})
	if e.Ready != nil {
		mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			if !e.Ready() {
				w.WriteHeader(http.StatusServiceUnavailable)
				_, _ = w.Write([]byte("not ready: no workload certificate yet, or shutting down\n"))
				return
			}
			_, _ = w.Write([]byte("ready\n"))
		})
	}
	if e.State != nil {
		mux.HandleFunc("GET /config", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(e.State())
		})
	}
	if e.Metrics != nil {
		mux.Handle("GET /metrics", e.Metrics)
	}
	if e.AppHealth != nil {
		mux.Handle("GET /app-health/", e.AppHealth)
	}
	if e.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	if e.Shutdown != nil {
		mux.HandleFunc("POST /shutdown", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			_, _ = w.Write([]byte("shutting down: draining in-flight requests\n"))
			e.Shutdown()
		})
	}
	return mux
}

// StatsHandler serves what scrapers and the kubelet may read — /metrics,
// /live, /ready, /app-health/ — and nothing else, for a listener reachable
// from outside the workload (the control plane and Prometheus scrape it),
// unlike the admin port, whose /config and /shutdown stay on loopback.
func StatsHandler(e Endpoints) http.Handler {
	return Handler(Endpoints{Ready: e.Ready, Metrics: e.Metrics, AppHealth: e.AppHealth})
}
