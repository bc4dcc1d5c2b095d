package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestDashboard runs examples/zero-trust, sends traffic through it — orders
// from checkout (mTLS, allowed), from badge-reader (mTLS, denied) and a
// plaintext attempt from legacy (refused by STRICT) — and loads the
// dashboard in headless Chromium: the workloads appear as nodes, the
// secured and the plaintext edges as such, the denial with its policy.
// The screenshot is saved in the test's artifacts (go test -artifacts).
func TestDashboard(t *testing.T) {
	dir, _ := exampleCopy(t, "zero-trust", "curl", "nginx", "python3")
	chromium := requireTool(t, "chromium")
	m := startUp(t, dir)
	t.Cleanup(m.stop)
	for range 3 {
		if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders"); r.err != nil {
			t.Fatalf("POST from checkout: %v %s", r.err, r.stderr)
		}
	}
	m.exec("default/badge-reader", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders")
	m.exec("default/legacy", "curl", "-sS", "--connect-timeout", "2", "-m", "5", "http://orders-api.shipping/v1/orders")

	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dash := background(t, dir, "Dashboard: http://"+listen+"/?key=", trellisBin, "dashboard", "-f", m.file, "--listen", listen)
	url := strings.Fields(strings.TrimPrefix(dash.ready, "Dashboard: "))[0]
	// Without the printed link's key, or from another site, nothing.
	for _, h := range []map[string]string{{}, {"Cookie": "trellis-dashboard=guess"}} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+listen+"/api/v1/status", nil)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("the dashboard answered without its key (%v): %v", h, err)
		} else {
			resp.Body.Close()
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	alloc, cancelAlloc := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1100),
		// No network but the dashboard's: the machine has none.
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-quic", true), chromedp.Flag("disable-dev-shm-usage", true),
	)...)
	defer cancelAlloc()
	browser, cancelBrowser := chromedp.NewContext(alloc, chromedp.WithErrorf(t.Logf))
	defer cancelBrowser()
	steps := []chromedp.Action[chromedp.Void]{chromedp.Navigate(url)}
	for _, sel := range []string{
		`#connection.live`,
		`#topology .node.meshed[data-workload="shipping/orders-api"]`,
		`#topology .node.meshed[data-workload="default/checkout"]`,
		`#topology .node.unmeshed[data-workload="default/legacy"]`,
		`#topology path.edge.mtls[data-source="default/checkout"][data-destination="shipping/orders-api"]`,
		`#topology path.edge.plaintext[data-source="(no sidecar)"][data-destination="shipping/orders-api"]`,
		`#denials tbody tr`,
	} {
		steps = append(steps, chromedp.Query(chromedp.CSS(sel), chromedp.NodeReady))
	}
	if err := chromedp.Do(browser, steps...); err != nil {
		t.Fatalf("the dashboard did not show the mesh: %v", err)
	}
	denial, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS(`#denials tbody`)))
	if err != nil {
		t.Fatal(err)
	}
	// The live tap: orders-api's proxies show checkout's next order.
	if err := chromedp.Do(browser,
		chromedp.SetValue(chromedp.CSS(`#tap-workload`), "shipping/orders-api"),
		chromedp.Click(chromedp.CSS(`#tap-start`)),
	); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the tap to start", func() bool {
		state, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS(`#tap-state`)))
		return err == nil && strings.HasPrefix(state, "tapping 2 proxies")
	})
	if r := m.exec("default/checkout", "curl", "-sS", "-m", "5", "-X", "POST", "http://orders-api.shipping/v1/orders"); r.err != nil {
		t.Fatalf("POST from checkout: %v %s", r.err, r.stderr)
	}
	if err := chromedp.Do(browser, chromedp.Query(chromedp.CSS(`#tap tbody tr.mtls`), chromedp.NodeVisible)); err != nil {
		t.Fatalf("the tap shows no request: %v", err)
	}
	row, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS(`#tap tbody tr`)))
	if err != nil || !strings.Contains(row, "POST") || !strings.Contains(row, "/v1/orders") || !strings.Contains(row, "allow (shipping/allow-checkout-to-orders)") {
		t.Fatalf("tap row %q, %v", row, err)
	}
	screenshot, err := chromedp.Run(browser, chromedp.FullScreenshot(100)) // 100: PNG
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`default/badge-reader\s+shipping/orders-api`).MatchString(denial) {
		t.Errorf("recent denials do not show badge-reader's: %q", denial)
	}
	path := filepath.Join(t.ArtifactDir(), "dashboard.png")
	if err := os.WriteFile(path, screenshot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}
