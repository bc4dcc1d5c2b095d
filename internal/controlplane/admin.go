package controlplane

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/dashboard"
	"github.com/trellis-mesh/trellis/internal/push"
	"github.com/trellis-mesh/trellis/internal/registry"
)

// Status is what GET /api/v1/status returns.
type Status struct {
	TrustDomain string `json:"trustDomain"`
	// Generation counts the configuration changes pushed since start.
	Generation uint64             `json:"generation"`
	Resources  ResourceStatus     `json:"resources"`
	Proxies    []push.ProxyStatus `json:"proxies"`
	// Converged is true when every connected proxy runs its current
	// version.
	Converged bool                   `json:"converged"`
	CA        CAStatus               `json:"ca"`
	Services  []registry.Destination `json:"services"`
}

// CAStatus summarizes the certificate authority.
type CAStatus struct {
	Roots        []CertStatus `json:"roots"`
	Intermediate CertStatus   `json:"intermediate"`
}

// CertStatus is one CA certificate.
type CertStatus struct {
	Subject   string    `json:"subject"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
}

// Status returns the control plane's view of the mesh.
func (cp *ControlPlane) Status() Status {
	cp.mu.Lock()
	res := cp.resources
	cp.mu.Unlock()
	st := Status{
		TrustDomain: cp.cfg.TrustDomain,
		Generation:  cp.push.Generation(),
		Resources:   res,
		Proxies:     cp.push.Status(),
		Converged:   true,
		Services:    cp.registry.Snapshot().Destinations(),
	}
	for _, p := range st.Proxies {
		if p.Connected && !p.InSync {
			st.Converged = false
		}
	}
	for _, r := range cp.ca.Bundle() {
		st.CA.Roots = append(st.CA.Roots, CertStatus{Subject: r.Subject.String(), NotBefore: r.NotBefore, NotAfter: r.NotAfter})
	}
	iss := cp.ca.Issuer()
	st.CA.Intermediate = CertStatus{Subject: iss.Subject.String(), NotBefore: iss.NotBefore, NotAfter: iss.NotAfter}
	return st
}

// adminHandler serves the admin API. Everything but /healthz needs the
// bearer credential from the state directory.
func (cp *ControlPlane) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /api/v1/status", cp.authenticated(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, cp.Status())
	}))
	// POST /api/v1/sync takes in pending resource changes and recomputes
	// the proxies' views before answering with the status.
	mux.Handle("POST /api/v1/sync", cp.authenticated(func(w http.ResponseWriter, _ *http.Request) {
		cp.Sync()
		writeJSON(w, cp.Status())
	}))
	// GET /api/v1/traffic?window=1m: golden metrics per workload and
	// edge, from the proxies' metrics.
	mux.Handle("GET /api/v1/traffic", cp.authenticated(func(w http.ResponseWriter, r *http.Request) {
		window, err := parseWindow(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, cp.Traffic(r.Context(), window))
	}))
	// GET /api/v1/events: a server-sent event "snapshot" (status and the
	// last minute's traffic) now and every EventInterval, for the
	// dashboard.
	mux.Handle("GET /api/v1/events", cp.authenticated(cp.serveEvents))
	// GET /api/v1/tap?workload=NS/NAME[&method=][&path=][&max=][&rate=]:
	// server-sent events "tap", one per request the workload's proxies see.
	mux.Handle("GET /api/v1/tap", cp.authenticated(cp.serveTap))
	mux.Handle("GET /dashboard/", cp.authenticated(dashboard.Handler("/dashboard/").ServeHTTP))
	return mux
}

// eventStream writes server-sent events. Each write must finish within
// eventWriteTimeout: a client that stops reading is dropped rather than
// holding its handler (and shutdown) forever.
type eventStream struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

const eventWriteTimeout = 10 * time.Second

func newEventStream(w http.ResponseWriter) *eventStream {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	return &eventStream{w: w, rc: http.NewResponseController(w)}
}

func (s *eventStream) send(event string, data []byte) error {
	_ = s.rc.SetWriteDeadline(time.Now().Add(eventWriteTimeout))
	if _, err := fmt.Fprintf(s.w, "event: %s\ndata: %s\n\n", event, data); err != nil {
		return err
	}
	return s.rc.Flush()
}

// EventInterval is how often /api/v1/events sends a snapshot.
const EventInterval = 2 * time.Second

// Snapshot is one event of /api/v1/events.
type Snapshot struct {
	Status  Status  `json:"status"`
	Traffic Traffic `json:"traffic"`
}

func (cp *ControlPlane) serveEvents(w http.ResponseWriter, r *http.Request) {
	sse := newEventStream(w)
	t := time.NewTicker(EventInterval)
	defer t.Stop()
	for {
		data, err := json.Marshal(Snapshot{Status: cp.Status(), Traffic: cp.Traffic(r.Context(), time.Minute)})
		if err != nil {
			cp.log.Error("encoding a dashboard snapshot", "err", err)
			return
		}
		if sse.send("snapshot", data) != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-cp.closing:
			return
		case <-t.C:
		}
	}
}

func (cp *ControlPlane) authenticated(h http.HandlerFunc) http.Handler {
	want := []byte("Bearer " + cp.token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="trellis"`)
			msg := "the admin API needs the credential from the state directory's " + AdminTokenFile + " file (Authorization: Bearer …)"
			if !strings.HasPrefix(string(got), "Bearer ") {
				msg = "missing credential: " + msg
			}
			http.Error(w, msg, http.StatusUnauthorized)
			return
		}
		h(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
