package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestEndpoints(t *testing.T) {
	ready := false
	state := State{Source: "static /x"}
	shutdowns := 0
	srv := httptest.NewServer(Handler(Endpoints{
		Ready:    func() bool { return ready },
		State:    func() State { return state },
		Shutdown: func() { shutdowns++ },
	}))
	defer srv.Close()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var buf [4096]byte
		n, _ := resp.Body.Read(buf[:])
		return resp.StatusCode, string(buf[:n])
	}
	if code, _ := get("/live"); code != http.StatusOK {
		t.Fatalf("/live = %d", code)
	}
	if code, _ := get("/ready"); code != http.StatusServiceUnavailable {
		t.Fatalf("/ready before the certificate = %d, want 503", code)
	}
	ready = true
	state.Identity = &Identity{SPIFFEID: "spiffe://cluster.local/ns/a/sa/b"}
	if code, _ := get("/ready"); code != http.StatusOK {
		t.Fatalf("/ready with a certificate = %d, want 200", code)
	}
	code, body := get("/config")
	var got State
	if err := json.Unmarshal([]byte(body), &got); err != nil || code != http.StatusOK {
		t.Fatalf("/config = %d %q: %v", code, body, err)
	}
	if got.Identity == nil || got.Identity.SPIFFEID != state.Identity.SPIFFEID || got.Source != state.Source {
		t.Fatalf("/config = %+v", got)
	}
	if resp, err := http.Post(srv.URL+"/ready", "text/plain", nil); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /ready: %v %v", resp.StatusCode, err)
	}
	if code, _ := get("/shutdown"); code != http.StatusMethodNotAllowed || shutdowns != 0 {
		t.Fatalf("GET /shutdown = %d and shut down %d times; only POST may", code, shutdowns)
	}
	if resp, err := http.Post(srv.URL+"/shutdown", "text/plain", nil); err != nil || resp.StatusCode != http.StatusOK || shutdowns != 1 {
		t.Fatalf("POST /shutdown: %v, %d shutdowns", err, shutdowns)
	}
}

// TestStatsHandler: the listener scrapers reach serves metrics and health,
// never the configuration or a shutdown.
func TestStatsHandler(t *testing.T) {
	shutdowns := 0
	srv := httptest.NewServer(StatsHandler(Endpoints{
		Ready:    func() bool { return true },
		State:    func() State { return State{Source: "static /x"} },
		Metrics:  http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("m 1\n")) }),
		Shutdown: func() { shutdowns++ },
	}))
	defer srv.Close()
	for path, want := range map[string]int{"/metrics": 200, "/ready": 200, "/live": 200, "/config": 404} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, want)
		}
	}
	resp, err := http.Post(srv.URL+"/shutdown", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK || shutdowns != 0 {
		t.Fatalf("POST /shutdown on the stats listener = %d, %d shutdowns", resp.StatusCode, shutdowns)
	}
}
