package controlplane

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// Client calls a control plane's admin API, verifying that the server is
// the control plane of the mesh whose trust bundle it holds.
type Client struct {
	base  string
	token string
	http  *http.Client
	// stream is http without a timeout, for event streams.
	stream *http.Client
}

// Dial builds a client from a state directory: the admin address from the
// running control plane's EndpointsFile (unless addr is given), the
// credential and the trust bundle.
func Dial(stateDir, addr string) (*Client, error) {
	if addr == "" {
		data, err := os.ReadFile(filepath.Join(stateDir, EndpointsFile))
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no control plane is running with state directory %s (start one with 'trellis control-plane', or give --admin-addr)", stateDir)
		}
		if err != nil {
			return nil, err
		}
		var ep Endpoints
		if err := json.Unmarshal(data, &ep); err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(stateDir, EndpointsFile), err)
		}
		addr = ep.Admin
	}
	token, err := os.ReadFile(filepath.Join(stateDir, AdminTokenFile))
	if err != nil {
		return nil, fmt.Errorf("admin credential: %w", err)
	}
	pem, err := os.ReadFile(ca.BundlePath(stateDir))
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	roots, err := certpem.ParseCerts(pem)
	if err != nil {
		return nil, fmt.Errorf("trust bundle %s: %w", ca.BundlePath(stateDir), err)
	}
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The server is verified below as an SVID of the bundle, with the
		// control plane's SPIFFE ID, instead of by host name.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyControlPlane(raw, roots)
		},
	}
	transport := &http.Transport{TLSClientConfig: tlsCfg}
	return &Client{
		base:   "https://" + addr,
		token:  strings.TrimSpace(string(token)),
		http:   &http.Client{Transport: transport, Timeout: 10 * time.Second},
		stream: &http.Client{Transport: transport},
	}, nil
}

func verifyControlPlane(raw [][]byte, roots []*x509.Certificate) error {
	if len(raw) == 0 {
		return errors.New("the server sent no certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return err
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return fmt.Errorf("the server's certificate is not an SVID: %w", err)
	}
	got, _, err := x509svid.ParseAndVerify(raw, x509bundle.FromX509Authorities(id.TrustDomain(), roots))
	if err != nil {
		return fmt.Errorf("the server is not part of this mesh: %w", err)
	}
	if want := meshid.ControlPlane(id.TrustDomain()); got != want {
		return fmt.Errorf("the server is %s, not the control plane %s", got, want)
	}
	return nil
}

// Status fetches the control plane's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/api/v1/status", &st)
	return st, err
}

// Sync makes the control plane take in resource changes it has not seen
// yet and recompute every view, then returns the status.
func (c *Client) Sync(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodPost, "/api/v1/sync", &st)
	return st, err
}

// Traffic fetches the traffic of the last window (at most
// MaxTrafficWindow).
func (c *Client) Traffic(ctx context.Context, window time.Duration) (Traffic, error) {
	var t Traffic
	err := c.do(ctx, http.MethodGet, "/api/v1/traffic?window="+url.QueryEscape(window.String()), &t)
	return t, err
}

func (c *Client) do(ctx context.Context, method, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("control plane admin API: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("control plane admin API: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return json.Unmarshal(body, v)
}

// Forwarder returns a handler that forwards the read-only parts of the
// admin API the dashboard uses (GET /dashboard/, /api/v1/status, traffic,
// events and tap) with c's credential and TLS verification, for `trellis
// dashboard` to serve on loopback so that a browser needs neither. It
// answers only a browser that came through the link with key (which sets
// a cookie), only requests of the dashboard's own pages (not another
// site's, by Sec-Fetch-Site and Origin), and only loopback host names
// (against DNS rebinding).
func (c *Client) Forwarder(key string) http.Handler {
	target, _ := url.Parse(c.base) // built by Dial
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = target.Host
			pr.Out.Header.Del("Cookie")
			pr.Out.Header.Set("Authorization", "Bearer "+c.token)
		},
		Transport:     c.http.Transport,
		FlushInterval: -1, // the event streams
	}
	const cookie = "trellis-dashboard"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			http.Error(w, "the dashboard answers on loopback addresses only", http.StatusForbidden)
			return
		}
		if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
			http.Error(w, "the dashboard answers its own pages only", http.StatusForbidden)
			return
		}
		if origin := r.Header.Get("Origin"); origin != "" && origin != "http://"+r.Host {
			http.Error(w, "the dashboard answers its own pages only", http.StatusForbidden)
			return
		}
		if r.Method != http.MethodGet {
			http.Error(w, "the dashboard is read-only", http.StatusMethodNotAllowed)
			return
		}
		if k := r.URL.Query().Get("key"); k != "" {
			if subtle.ConstantTimeCompare([]byte(k), []byte(key)) != 1 {
				http.Error(w, "this link is not the one trellis dashboard printed", http.StatusForbidden)
				return
			}
			http.SetCookie(w, &http.Cookie{Name: cookie, Value: key, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode})
			http.Redirect(w, r, "/dashboard/", http.StatusFound)
			return
		}
		if ck, err := r.Cookie(cookie); err != nil || subtle.ConstantTimeCompare([]byte(ck.Value), []byte(key)) != 1 {
			http.Error(w, "open the dashboard with the link trellis dashboard printed", http.StatusForbidden)
			return
		}
		switch {
		case r.URL.Path == "/":
			http.Redirect(w, r, "/dashboard/", http.StatusFound)
		case strings.HasPrefix(r.URL.Path, "/dashboard/"), r.URL.Path == "/api/v1/status", r.URL.Path == "/api/v1/traffic", r.URL.Path == "/api/v1/events", r.URL.Path == "/api/v1/tap":
			rp.ServeHTTP(w, r)
		default:
			http.NotFound(w, r)
		}
	})
}
