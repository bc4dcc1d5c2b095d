// Package admin serves the proxy's admin endpoints on a loopback port:
// liveness, readiness, and the identity and configuration the proxy runs
// with. Operators and the control plane's CLI read them; nothing on this
// port changes the proxy's behaviour except an explicit shutdown request.
package admin

import (
	"encoding/json"
	"net/http"
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
}

// Handler returns the admin mux. ready reports whether the proxy can serve
// traffic; state returns what /config shows.
func Handler(ready func() bool, state func() State) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("live\n"))
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ready() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: no workload certificate yet\n"))
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	mux.HandleFunc("GET /config", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(state())
	})
	return mux
}
