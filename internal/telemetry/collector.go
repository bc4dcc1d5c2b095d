package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"
)

// Target is one proxy to scrape.
type Target struct {
	Instance string // namespace/workload/instance
	Workload string // namespace/name
	Identity string // the SPIFFE ID it proved
	Addr     string // its stats listener, ip:port
}

// Config configures a Collector.
type Config struct {
	// Targets lists the proxies to scrape now.
	Targets func() []Target
	// Interval between scrapes of every proxy; 10s if zero.
	Interval time.Duration
	// Retain is how much history is kept, the longest window answered;
	// 15 minutes if zero.
	Retain time.Duration
	// Client scrapes; one with a 3s timeout and no proxy if nil.
	Client *http.Client
	Now    func() time.Time
	Log    *slog.Logger
}

// Collector scrapes the proxies and keeps their history.
type Collector struct {
	cfg Config
	// scrapeMu makes scrapes one at a time, so that a query that asks for
	// fresh data waits for the scrape in progress rather than starting a
	// second.
	scrapeMu sync.Mutex
	mu       sync.Mutex
	hist     map[string]*history // by instance
	last     time.Time           // when the last scrape ended
	// lastTargets are the instances the last scrape covered, sorted.
	lastTargets []string
}

// history is one proxy's scrapes, oldest first.
type history struct {
	target Target
	snaps  []*snapshot
	err    string // the last scrape's failure, "" after a success
}

// New returns a collector; Run scrapes periodically.
func New(cfg Config) *Collector {
	if cfg.Interval == 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Retain == 0 {
		cfg.Retain = 15 * time.Minute
	}
	if cfg.Client == nil {
		// Straight to the proxies: never through an HTTP_PROXY of the
		// control plane's environment.
		cfg.Client = &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Minute}}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Collector{cfg: cfg, hist: map[string]*history{}}
}

// Run scrapes every Interval until ctx ends.
func (c *Collector) Run(ctx context.Context) error {
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	for {
		c.Scrape(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// freshWait bounds how long a query waits for a fresh scrape before it
// answers from the history (slow or unreachable proxies must not make
// every query time out).
const freshWait = 1500 * time.Millisecond

// Fresh scrapes now, so that a query right after some traffic sees it,
// unless the last scrape ended less than maxAge ago and covered the same
// proxies. It waits for the scrape at most freshWait (or until ctx ends);
// the scrape itself is the collector's, not ended by the caller leaving.
func (c *Collector) Fresh(ctx context.Context, maxAge time.Duration) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.scrapeMu.Lock()
		defer c.scrapeMu.Unlock()
		c.mu.Lock()
		recent := c.cfg.Now().Sub(c.last) < maxAge && slices.Equal(c.lastTargets, instances(c.cfg.Targets()))
		c.mu.Unlock()
		if !recent {
			c.scrapeLocked(context.Background())
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
	case <-time.After(freshWait):
	}
}

func instances(ts []Target) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Instance
	}
	slices.Sort(out)
	return out
}

// Scrape reads every target's metrics once, a few at a time, and drops
// what is older than Retain and the proxies that are gone.
func (c *Collector) Scrape(ctx context.Context) {
	c.scrapeMu.Lock()
	defer c.scrapeMu.Unlock()
	c.scrapeLocked(ctx)
}

func (c *Collector) scrapeLocked(ctx context.Context) {
	targets := c.cfg.Targets()
	type result struct {
		t    Target
		snap *snapshot
		err  error
	}
	results := make(chan result, len(targets))
	sem := make(chan struct{}, 16)
	for _, t := range targets {
		go func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			snap, err := c.scrape(ctx, t)
			results <- result{t, snap, err}
		}()
	}
	got := make([]result, 0, len(targets))
	for range targets {
		got = append(got, <-results)
	}
	now := c.cfg.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := map[string]bool{}
	for _, r := range got {
		seen[r.t.Instance] = true
		h := c.hist[r.t.Instance]
		if h == nil || h.target != r.t {
			h = &history{target: r.t} // new, or another proxy took the name
			c.hist[r.t.Instance] = h
		}
		if r.err != nil {
			if ctx.Err() != nil {
				continue // the scrape was called off, not the proxy's fault
			}
			if h.err != r.err.Error() {
				c.cfg.Log.Warn("scraping a proxy's metrics failed", "instance", r.t.Instance, "addr", r.t.Addr, "err", r.err)
			}
			h.err = r.err.Error()
			continue
		}
		h.err = ""
		// Snapshots closer together than Interval (queries scrape on
		// demand) replace the newest rather than pile up: the history
		// stays about Retain/Interval long, its baselines as old.
		if n := len(h.snaps); n >= 2 && r.snap.at.Sub(h.snaps[n-2].at) < c.cfg.Interval && r.snap.start == h.snaps[n-1].start {
			h.snaps[n-1] = r.snap
		} else {
			h.snaps = append(h.snaps, r.snap)
		}
		// Keep one snapshot older than Retain: the baseline of the
		// longest window.
		cut := 0
		for cut+1 < len(h.snaps) && now.Sub(h.snaps[cut+1].at) >= c.cfg.Retain {
			cut++
		}
		h.snaps = h.snaps[cut:]
	}
	for k := range c.hist {
		if !seen[k] {
			delete(c.hist, k)
		}
	}
	if ctx.Err() == nil {
		c.last = now
		c.lastTargets = instances(targets)
	}
}

func (c *Collector) scrape(ctx context.Context, t Target) (*snapshot, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+t.Addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := c.cfg.Client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return parseSnapshot(resp.Body, c.cfg.Now())
}

// Failures returns, by instance, why the last scrape of a proxy failed.
func (c *Collector) Failures() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for k, h := range c.hist {
		if h.err != "" {
			out[k] = h.err
		}
	}
	return out
}
