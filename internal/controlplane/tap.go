package controlplane

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/push"
)

// TapEvent is one request a tap saw, as GET /api/v1/tap streams it.
type TapEvent struct {
	Time        time.Time `json:"time"`
	Instance    string    `json:"instance"` // the proxy that saw it
	Direction   string    `json:"direction"`
	Source      string    `json:"source"`
	Destination string    `json:"destination"`
	Authority   string    `json:"authority,omitempty"`
	Method      string    `json:"method"`
	Path        string    `json:"path"`
	Status      int       `json:"status"`
	LatencyMs   float64   `json:"latencyMs"`
	MTLS        bool      `json:"mtls"`
	Decision    string    `json:"decision,omitempty"`
	Policy      string    `json:"policy,omitempty"`
}

// TapRequest says what to tap.
type TapRequest struct {
	Workload   string // namespace/name
	Method     string
	PathPrefix string
	// Max ends the tap after that many events (0: until the caller
	// leaves); MaxPerSecond bounds each proxy's rate (0: its default).
	Max, MaxPerSecond int
}

// maxTapEvents bounds a tap that asked for no bound.
const maxTapEvents = 100000

func (r TapRequest) query() string {
	q := url.Values{"workload": {r.Workload}}
	for k, v := range map[string]string{"method": r.Method, "path": r.PathPrefix} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if r.Max > 0 {
		q.Set("max", strconv.Itoa(r.Max))
	}
	if r.MaxPerSecond > 0 {
		q.Set("rate", strconv.Itoa(r.MaxPerSecond))
	}
	return q.Encode()
}

func parseTapRequest(r *http.Request) (TapRequest, error) {
	q := r.URL.Query()
	req := TapRequest{Workload: q.Get("workload"), Method: q.Get("method"), PathPrefix: q.Get("path")}
	if !strings.Contains(req.Workload, "/") {
		return req, errors.New("workload: name the workload to tap as NAMESPACE/NAME")
	}
	if req.PathPrefix != "" && !strings.HasPrefix(req.PathPrefix, "/") {
		return req, fmt.Errorf("path %q: a path prefix starts with /", req.PathPrefix)
	}
	for name, dst := range map[string]*int{"max": &req.Max, "rate": &req.MaxPerSecond} {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return req, fmt.Errorf("%s %q: give a count", name, v)
			}
			*dst = n
		}
	}
	return req, nil
}

// serveTap streams a tap's events as server-sent events ("tap"), until the
// caller leaves or Max events have been sent.
func (cp *ControlPlane) serveTap(w http.ResponseWriter, r *http.Request) {
	req, err := parseTapRequest(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	events, proxies, err := cp.push.StartTap(ctx, req.Workload, push.TapFilter{Method: req.Method, PathPrefix: req.PathPrefix, MaxPerSecond: uint32(req.MaxPerSecond)})
	if errors.Is(err, push.ErrNoTapStream) {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	sse := newEventStream(w)
	if sse.send("started", fmt.Appendf(nil, `{"proxies": %d}`, proxies)) != nil {
		return
	}
	limit := req.Max
	if limit == 0 {
		limit = maxTapEvents
	}
	for sent := 0; sent < limit; {
		select {
		case <-cp.closing:
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			data, _ := json.Marshal(TapEvent{
				Time: time.Unix(0, ev.GetUnixNanos()), Instance: ev.Instance, Direction: ev.GetDirection(), Source: ev.GetSource(),
				Destination: ev.GetDestination(), Authority: ev.GetAuthority(), Method: ev.GetMethod(), Path: ev.GetPath(),
				Status: int(ev.GetStatus()), LatencyMs: float64(ev.GetLatencyMicros()) / 1000, MTLS: ev.GetTls(),
				Decision: ev.GetDecision(), Policy: ev.GetPolicy(),
			})
			if sse.send("tap", data) != nil {
				return
			}
			sent++
		}
	}
}

// Tap runs a tap and calls fn with each event until fn returns false, the
// tap's Max is reached, or ctx ends. started is called once the proxies
// are tapped, with how many.
func (c *Client) Tap(ctx context.Context, req TapRequest, started func(proxies int), fn func(TapEvent) bool) error {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/api/v1/tap?"+req.query(), nil)
	if err != nil {
		return err
	}
	hreq.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.stream.Do(hreq)
	if err != nil {
		return fmt.Errorf("control plane admin API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b strings.Builder
		_, _ = bufio.NewReader(resp.Body).WriteTo(&b)
		return fmt.Errorf("control plane admin API: %s: %s", resp.Status, strings.TrimSpace(b.String()))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	event := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: ") && event == "started":
			var s struct{ Proxies int }
			_ = json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &s)
			if started != nil {
				started(s.Proxies)
			}
		case strings.HasPrefix(line, "data: ") && event == "tap":
			var ev TapEvent
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev); err != nil {
				return fmt.Errorf("tap event: %w", err)
			}
			if !fn(ev) {
				return nil
			}
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}
