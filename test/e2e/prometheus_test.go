package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrapeWithPrometheus runs a real Prometheus against the stats listeners
// of a running mesh (as docs/metrics.md configures it), and checks that
// the queries the docs give answer for workload: requests/s, success
// rate and p99 latency. traffic sends requests to workload once Prometheus
// scrapes every proxy (a counter's rate needs it to grow while watched).
func scrapeWithPrometheus(t *testing.T, dir string, statsAddrs []string, workloadID string, traffic func()) {
	t.Helper()
	prometheus := requireTool(t, "prometheus")
	data := t.TempDir()
	var targets []string
	for _, a := range statsAddrs {
		targets = append(targets, strconv.Quote(a))
	}
	cfg := filepath.Join(data, "prometheus.yml")
	config := fmt.Sprintf("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n  - job_name: trellis-proxies\n    static_configs:\n      - targets: [%s]\n", strings.Join(targets, ", "))
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	background(t, dir, "Server is ready to receive web requests", prometheus, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(data, "tsdb"),
		"--web.listen-address="+listen, "--log.level=info")
	query := func(q string) (float64, bool) {
		resp, err := http.Get("http://" + listen + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var r struct {
			Data struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || len(r.Data.Result) == 0 {
			return 0, false
		}
		s, _ := r.Data.Result[0].Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		return v, err == nil
	}
	sel := fmt.Sprintf(`direction="inbound",destination=%q`, workloadID)
	// Every target up, then the docs' queries (over 1m: the proxies'
	// counters started with the mesh).
	waitFor(t, 30*time.Second, "Prometheus to scrape every proxy", func() bool {
		v, ok := query(`sum(up{job="trellis-proxies"})`)
		return ok && int(v) == len(statsAddrs)
	})
	traffic()
	for name, q := range map[string]string{
		"requests/s":   fmt.Sprintf(`sum by (destination) (rate(trellis_requests_total{%s}[1m]))`, sel),
		"success rate": fmt.Sprintf(`sum by (destination) (rate(trellis_requests_total{%s,status_class!="5xx"}[1m])) / sum by (destination) (rate(trellis_requests_total{%s}[1m]))`, sel, sel),
		"p99":          fmt.Sprintf(`histogram_quantile(0.99, sum by (destination, le) (rate(trellis_request_duration_seconds_bucket{%s}[1m])))`, sel),
	} {
		waitFor(t, 30*time.Second, "Prometheus to answer "+name, func() bool {
			v, ok := query(q)
			return ok && v > 0
		})
	}
}
