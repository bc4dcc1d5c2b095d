package proxy

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"testing"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

func TestAppHealth(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz":
			if r.Header.Get("X-Probe") != "kubelet" || r.Host != "app.local" {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			_, _ = w.Write([]byte("ok"))
		case "/broken":
			w.WriteHeader(http.StatusInternalServerError)
		case "/moved":
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		}
	}))
	defer app.Close()
	u, _ := url.Parse(app.URL)
	port, _ := strconv.Atoi(u.Port())
	// A port nothing listens on.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().(*net.TCPAddr).Port
	l.Close()

	h := AppHealth(map[string]config.AppProbe{
		"api/readyz":   {Port: uint32(port), Path: "/healthz", Headers: map[string]string{"X-Probe": "kubelet", "Host": "app.local"}},
		"api/livez":    {Port: uint32(port), Path: "/broken"},
		"api/startupz": {Port: uint32(port), Path: "/moved"},
		"db/readyz":    {Port: uint32(closed), Path: "/"},
	})
	for _, tc := range []struct {
		path string
		want int
	}{
		{"/app-health/api/readyz", http.StatusOK},
		{"/app-health/api/livez", http.StatusInternalServerError},
		{"/app-health/api/startupz", http.StatusFound}, // not followed: the kubelet counts 3xx as success
		{"/app-health/db/readyz", http.StatusServiceUnavailable},
		{"/app-health/nope/readyz", http.StatusNotFound},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tc.path, nil))
		if rec.Code != tc.want {
			t.Errorf("GET %s: %d, want %d (%s)", tc.path, rec.Code, tc.want, rec.Body)
		}
	}
}
