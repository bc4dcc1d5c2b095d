package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/config"
)

// AppHealthPrefix is where AppHealth serves: /app-health/CONTAINER/KIND.
const AppHealthPrefix = "/app-health/"

// AppHealth answers the kubelet's probes of the application, which
// injection moved to the proxy's stats listener, by making them on
// loopback: a probe arriving from outside the pod in plaintext would
// otherwise be refused by a STRICT port. The answer carries the
// application's status code (the kubelet counts 200–399 as success) and
// nothing of its body.
func AppHealth(probes map[string]config.AppProbe) http.Handler {
	transport := &http.Transport{
		// The kubelet does not verify an application's HTTPS probe either.
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     30 * time.Second,
	}
	client := &http.Client{
		Transport: transport,
		// A redirect's status is the answer, as the kubelet reads it.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Path[len(AppHealthPrefix):]
		p, ok := probes[key]
		if !ok {
			http.Error(w, fmt.Sprintf("no application probe %q", key), http.StatusNotFound)
			return
		}
		scheme := "http"
		if p.Scheme == "HTTPS" {
			scheme = "https"
		}
		// The kubelet's own timeout ends the request; this bounds one
		// that never would.
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		url := scheme + "://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(int(p.Port))) + p.Path
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		for k, v := range p.Headers {
			if http.CanonicalHeaderKey(k) == "Host" {
				req.Host = v
				continue
			}
			req.Header.Set(k, v)
		}
		req.Header.Set("User-Agent", "kube-probe (via trellis-proxy)")
		resp, err := client.Do(req)
		if err != nil {
			http.Error(w, "the application did not answer its probe: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
	})
}
