package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/trellis-mesh/trellis/internal/meshid"
)

// harness holds one run: the control plane, the simulated proxies and what
// they received.
type harness struct {
	o         options
	log       *slog.Logger
	cp        *controlPlane
	work      string
	resources string

	creds   []credentials.TransportCredentials
	act     activity
	proxies []*simProxy // connected; failed ones are only counted
	extra   *simProxy
}

// measure runs every phase and returns what was measured so far, also
// when it fails part-way.
func (h *harness) measure(ctx context.Context) (*result, error) {
	res := &result{
		Proxies: h.o.shape.proxies, Workloads: h.o.shape.workloads, Namespaces: h.o.shape.namespaces,
		Endpoints: h.o.shape.endpoints, InProcess: h.cp.inProcess, Machine: machine(), Started: time.Now().UTC(),
	}
	var err error
	if h.creds, err = identities(h.cp.stateDir, h.o.shape); err != nil {
		return nil, err
	}
	// The baseline: serving, no proxy connected, the SVIDs signed.
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}
	idle := h.cp.sample()
	res.Memory.IdleRSSKB = idle.RSSKB
	self0 := selfSample()
	var heap0 runtime.MemStats
	if h.cp.inProcess {
		runtime.GC()
		runtime.ReadMemStats(&heap0)
	}

	stopProfile := h.startProfile("connect")
	res.Connect, err = h.connectAll(ctx, idle)
	stopProfile()
	if err != nil {
		return res, err
	}
	res.Memory.ConvergedRSSKB = h.cp.sample().RSSKB
	// Let the garbage collector and the scavenger catch up with the
	// pushes of the ramp-up before reading the steady state.
	if err := sleep(ctx, h.o.settle); err != nil {
		return res, err
	}
	steady := h.cp.sample()
	res.Memory.SteadyRSSKB = steady.RSSKB
	res.Memory.RampPeakRSSKB, res.Memory.PeakRSSKB = steady.HWMKB, steady.HWMKB
	n := int64(len(h.proxies))
	if n > 0 {
		res.Memory.PerProxyKB = float64(steady.RSSKB-idle.RSSKB) / float64(n)
	}
	if h.cp.inProcess {
		// After one GC the buffer pools (sync.Pool) still hold what the
		// last pushes used; after two more they are empty.
		res.Memory.HeapPerProxyKB = heapGrowthKB(&heap0, n, 1)
		h.writeProfile("heap", "connected-1gc")
		res.Memory.HeapPerProxyKBNoPools = heapGrowthKB(&heap0, n, 2)
		h.writeProfile("heap", "connected-3gc")
	}
	h.log.Info("connected and converged", "proxies", n, "rssMB", steady.RSSKB>>10, "perProxyKB", fmt.Sprintf("%.1f", res.Memory.PerProxyKB))

	for _, ph := range h.phases() {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		stopProfile := h.startProfile(ph.name)
		h.writeProfile("allocs", slug(ph.name)+"-base")
		pr, err := h.measurePhase(ctx, ph)
		h.writeProfile("allocs", slug(ph.name))
		stopProfile()
		if err != nil {
			return res, fmt.Errorf("phase %s: %w", ph.name, err)
		}
		res.Phases = append(res.Phases, pr)
		h.log.Info("phase done", "phase", pr.Name, "pushed", pr.Pushed, "expected", pr.Expected,
			"p50ms", pr.P50ms, "p99ms", pr.P99ms, "maxMs", pr.MaxMs, "cpuUsPerUpdate", fmt.Sprintf("%.0f", pr.CPUPerUpdateUs))
	}

	if h.cp.inProcess {
		res.Memory.HeapPerProxyKBEnd = heapGrowthKB(&heap0, n, 3)
		h.writeProfile("heap", "end-3gc")
	}
	end := h.cp.sample()
	res.Memory.EndRSSKB = end.RSSKB
	for _, p := range res.Phases {
		res.Memory.PeakRSSKB = max(res.Memory.PeakRSSKB, p.PeakRSSKB)
	}
	res.CPU.ControlPlaneSeconds = cpuSeconds(idle, end)
	res.CPU.HarnessSeconds = cpuSeconds(self0, selfSample())
	if h.cp.inProcess {
		res.CPU.HarnessSeconds = 0 // the same process
	}
	// The control plane's own view at the end: every proxy in sync.
	res.FinalCheck = h.confirm(ctx)
	res.Targets = targets(res)
	return res, nil
}

// heapGrowthKB runs gcs garbage collections and returns the growth of the
// heap in use since base, per proxy (profiling mode).
func heapGrowthKB(base *runtime.MemStats, proxies int64, gcs int) float64 {
	for range gcs {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return (float64(m.HeapInuse) - float64(base.HeapInuse)) / 1024 / float64(max(proxies, 1))
}

// connectAll connects every proxy with bounded concurrency and waits until
// they all run the same configuration as the control plane says they
// should.
func (h *harness) connectAll(ctx context.Context, idle procSample) (connectResult, error) {
	var cr connectResult
	ctx, cancel := context.WithTimeout(ctx, h.o.connectTimeout)
	defer cancel()
	start := time.Now()
	jobs := make(chan int)
	var (
		mu        sync.Mutex
		connected = make([]*simProxy, 0, h.o.shape.proxies)
		failures  []string
		done      int
	)
	var wg sync.WaitGroup
	for range h.o.concurrency {
		wg.Go(func() {
			for i := range jobs {
				p := &simProxy{idx: i, workload: h.o.shape.workloadOf(i), instance: instanceName(i), decodeAll: i == 0}
				err := p.dial(ctx, h.cp.addr, h.creds[p.workload], h.o.dialTimeout)
				if err == nil {
					err = p.hello(&h.act, h.o.shape.endpoints)
				}
				mu.Lock()
				if err != nil {
					p.close()
					failures = append(failures, fmt.Sprintf("%s: %v", p.instance, err))
				} else {
					connected = append(connected, p)
				}
				done++
				if done%1000 == 0 {
					h.log.Info("connecting", "done", done, "of", h.o.shape.proxies, "failed", len(failures))
				}
				mu.Unlock()
			}
		})
	}
feed:
	for i := range h.o.shape.proxies {
		select {
		case jobs <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	slices.SortFunc(connected, func(a, b *simProxy) int { return a.idx - b.idx })
	h.proxies = connected
	cr.Seconds = time.Since(start).Seconds()
	cr.Failed = len(failures) + h.o.shape.proxies - done
	cr.Errors = firstN(failures, 5)
	if err := ctx.Err(); errors.Is(err, context.DeadlineExceeded) {
		return cr, fmt.Errorf("connecting: %d of %d proxies connected within -connect-timeout %v", len(connected), h.o.shape.proxies, h.o.connectTimeout)
	} else if err != nil {
		return cr, fmt.Errorf("interrupted while connecting (%d of %d connected)", len(connected), h.o.shape.proxies)
	}
	h.log.Info("all streams open; waiting for every proxy to converge", "connected", len(connected), "failed", cr.Failed, "seconds", fmt.Sprintf("%.1f", cr.Seconds))

	// Converged: every proxy has an update, none arrived for a while,
	// and the control plane agrees that each runs its current version.
	poll := time.NewTicker(200 * time.Millisecond)
	defer poll.Stop()
	quiet := 2 * time.Second
	for {
		select {
		case <-ctx.Done():
			return cr, fmt.Errorf("the proxies did not converge within %v of the start", h.o.connectTimeout)
		case <-poll.C:
		}
		if err := h.endedStreams(); err != nil {
			return cr, err
		}
		if time.Since(time.Unix(0, h.act.lastAt.Load())) < quiet || !h.allHaveUpdates() {
			continue
		}
		c := h.confirm(ctx)
		if !c.Agrees {
			h.log.Info("not converged yet", "detail", c.Detail)
			quiet = 5 * time.Second // do not poll the admin API hard
			continue
		}
		break
	}
	// Convergence time: the latest receipt of a proxy's final version.
	var last time.Time
	for _, p := range h.proxies {
		rs, v, _ := p.snapshot()
		if at, ok := firstReceiptOf(rs, v); ok && at.After(last) {
			last = at
		}
	}
	cr.ConvergedSeconds = last.Sub(start).Seconds()
	cr.Updates = int(h.act.updates.Load())
	cr.ControlPlaneCPUSeconds = cpuSeconds(idle, h.cp.sample())
	for _, p := range h.proxies {
		p.reset()
	}
	return cr, nil
}

// endedStreams reports the streams that ended: a simulated proxy does not
// reconnect, so the run cannot converge without it.
func (h *harness) endedStreams() error {
	var ended []string
	for _, p := range h.proxies {
		if _, _, err := p.snapshot(); err != nil {
			ended = append(ended, fmt.Sprintf("%s: %v", p.instance, err))
		}
	}
	if len(ended) == 0 {
		return nil
	}
	return fmt.Errorf("%d streams ended while converging, first: %v", len(ended), firstN(ended, 3))
}

func (h *harness) allHaveUpdates() bool {
	for _, p := range h.proxies {
		if _, v, err := p.snapshot(); v == "" || err != nil {
			return false
		}
	}
	return true
}

// phase is one measured change.
type phase struct {
	name   string
	change string // what is changed, for the report
	// affects says which of the N proxies must receive an update.
	affects func(p *simProxy) bool
	// prepare runs before the measurement starts (not timed).
	prepare func(ctx context.Context) error
	// apply makes the change and returns when it was made.
	apply func(ctx context.Context) (time.Time, error)
	// after runs once the phase is measured.
	after func()
}

func (h *harness) phases() []phase {
	shape := h.o.shape
	nsIdx := shape.namespaces - 1
	ns := namespaceName(nsIdx)
	all := func(*simProxy) bool { return true }
	return []phase{
		{
			name:    "namespace policy",
			change:  fmt.Sprintf("AuthorizationPolicy added in namespace %s", ns),
			affects: func(p *simProxy) bool { return shape.namespaceOf(p.workload) == nsIdx },
			apply: func(context.Context) (time.Time, error) {
				return h.writeResource("bench-"+ns+".yaml", authorizationPolicy("bench-allow-"+ns, ns))
			},
		},
		{
			name:    "mesh-wide policy",
			change:  fmt.Sprintf("AuthorizationPolicy added in namespace %s", meshid.RootNamespace),
			affects: all,
			apply: func(context.Context) (time.Time, error) {
				return h.writeResource("bench-mesh.yaml", authorizationPolicy("bench-allow-mesh", meshid.RootNamespace))
			},
		},
		{
			name:    "endpoint added",
			change:  fmt.Sprintf("one more instance of %s/%s registers", namespaceName(shape.namespaceOf(0)), workloadName(0)),
			affects: all,
			prepare: func(ctx context.Context) error {
				h.extra = &simProxy{idx: -1, workload: 0, instance: "extra"}
				return h.extra.dial(ctx, h.cp.addr, h.creds[0], h.o.dialTimeout)
			},
			apply: func(context.Context) (time.Time, error) {
				t0 := time.Now()
				// Registers with a port whatever -endpoints says: this
				// phase is about an endpoint appearing.
				return t0, h.extra.hello(&h.act, true)
			},
		},
		{
			name:    "endpoint removed",
			change:  "that instance says Goodbye",
			affects: all,
			apply: func(context.Context) (time.Time, error) {
				t0 := time.Now()
				return t0, h.extra.goodbye()
			},
			after: func() {
				h.extra.close()
				h.extra = nil
			},
		},
	}
}

// writeResource puts a file into the watched resource directory in one
// step (written beside it, then renamed in) and returns when it appeared.
func (h *harness) writeResource(name, content string) (time.Time, error) {
	tmp := filepath.Join(h.work, name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return time.Time{}, err
	}
	t0 := time.Now()
	return t0, os.Rename(tmp, filepath.Join(h.resources, name))
}

// measurePhase makes one change and measures its arrival at every proxy.
func (h *harness) measurePhase(ctx context.Context, ph phase) (phaseResult, error) {
	pr := phaseResult{Name: ph.name, Change: ph.change}
	if ph.prepare != nil {
		if err := ph.prepare(ctx); err != nil {
			return pr, err
		}
	}
	if ph.after != nil {
		defer ph.after()
	}
	for _, p := range h.proxies {
		p.reset()
		if ph.affects(p) {
			pr.Expected++
		}
	}
	peakErr := resetPeak(h.cp.pid)
	cp0, self0 := h.cp.sample(), selfSample()
	t0, err := ph.apply(ctx)
	if err != nil {
		return pr, err
	}
	deadline := t0.Add(h.o.phaseTimeout)
	for {
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return pr, err
		}
		last := time.Unix(0, h.act.lastAt.Load())
		if h.affectedHaveUpdates(ph) && last.After(t0) && time.Since(last) >= h.o.quiet {
			break
		}
		if time.Now().After(deadline) {
			pr.TimedOut = true
			h.log.Warn("phase timed out: not every affected proxy received an update", "phase", ph.name, "timeout", h.o.phaseTimeout)
			break
		}
	}
	cp1, self1 := h.cp.sample(), selfSample()
	pr.StartRSSKB = cp0.RSSKB
	if peakErr == nil {
		pr.PeakRSSKB = cp1.HWMKB
	} else if !h.cp.inProcess {
		h.log.Warn("cannot reset the control plane's VmHWM; the phase's peak is not measured", "err", peakErr)
	}

	var lat []time.Duration
	for _, p := range h.proxies {
		rs, v, err := p.snapshot()
		pr.Updates += len(rs)
		if err != nil {
			pr.StreamErrors++
		}
		if len(rs) > 0 {
			pr.UpdateBytes = max(pr.UpdateBytes, p.bytes())
		}
		if !ph.affects(p) {
			if len(rs) > 0 {
				pr.Unexpected++
			}
			continue
		}
		if len(rs) == 0 {
			continue
		}
		pr.Pushed++
		if at, ok := firstReceiptOf(rs, v); ok {
			lat = append(lat, at.Sub(t0))
		}
	}
	if h.extra != nil {
		rs, _, _ := h.extra.snapshot()
		pr.Updates += len(rs)
	}
	pr.Converged = len(lat)
	pr.P50ms, pr.P99ms, pr.MaxMs = percentiles(lat)
	pr.ControlPlaneCPUSeconds = cpuSeconds(cp0, cp1)
	pr.ControlPlaneSchedSeconds = schedSeconds(cp0, cp1)
	if pr.Updates > 0 {
		pr.CPUPerUpdateUs = pr.ControlPlaneCPUSeconds / float64(pr.Updates) * 1e6
	}
	if !h.cp.inProcess {
		pr.HarnessCPUSeconds = cpuSeconds(self0, self1)
	}
	if d, ok := h.observerDestinations(); ok {
		pr.Destinations, pr.Endpoints = d[0], d[1]
	}
	pr.Check = h.confirm(ctx)
	return pr, nil
}

func (h *harness) affectedHaveUpdates(ph phase) bool {
	for _, p := range h.proxies {
		if !ph.affects(p) {
			continue
		}
		p.mu.Lock()
		n := len(p.receipts)
		p.mu.Unlock()
		if n == 0 {
			return false
		}
	}
	return true
}

// observerDestinations returns the destinations and endpoints of the last
// update of proxy 0, which decodes its updates in full.
func (h *harness) observerDestinations() ([2]int, bool) {
	for _, p := range h.proxies {
		if p.decodeAll {
			p.mu.Lock()
			defer p.mu.Unlock()
			return [2]int{p.destinations, p.endpoints}, true
		}
	}
	return [2]int{}, false
}

func (p *simProxy) bytes() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastBytes
}

// confirm asks the control plane whether every proxy runs its current
// version, and whether that is the version the proxy last received.
func (h *harness) confirm(ctx context.Context) check {
	st, err := h.cp.status(ctx)
	if err != nil {
		return check{Detail: "admin API: " + err.Error()}
	}
	byInstance := make(map[string]int, len(st.Proxies))
	connected := 0
	for i, ps := range st.Proxies {
		byInstance[ps.Instance] = i
		if ps.Connected {
			connected++
		}
	}
	var mismatch []string
	for _, p := range h.proxies {
		key := namespaceName(h.o.shape.namespaceOf(p.workload)) + "/" + workloadName(p.workload) + "/" + p.instance
		_, v, serr := p.snapshot()
		i, ok := byInstance[key]
		switch {
		case serr != nil:
			mismatch = append(mismatch, fmt.Sprintf("%s: stream ended: %v", key, serr))
		case !ok:
			mismatch = append(mismatch, key+": unknown to the control plane")
		case !st.Proxies[i].Connected:
			mismatch = append(mismatch, key+": disconnected")
		case !st.Proxies[i].InSync:
			mismatch = append(mismatch, fmt.Sprintf("%s: not in sync (acked %s, current %s)", key, st.Proxies[i].AckedVersion, st.Proxies[i].CurrentVersion))
		case st.Proxies[i].CurrentVersion != v:
			mismatch = append(mismatch, fmt.Sprintf("%s: received %s, control plane says %s", key, v, st.Proxies[i].CurrentVersion))
		}
	}
	c := check{Converged: st.Converged, Connected: connected, Mismatched: len(mismatch)}
	var detail []string
	if !st.Converged {
		detail = append(detail, "the control plane reports converged=false")
	}
	if len(st.Resources.Error) > 0 {
		detail = append(detail, fmt.Sprintf("resources rejected: %+v", st.Resources.Error))
	}
	detail = append(detail, firstN(mismatch, 3)...)
	if len(mismatch) > 3 {
		detail = append(detail, fmt.Sprintf("and %d more", len(mismatch)-3))
	}
	c.Agrees = len(detail) == 0
	if !c.Agrees {
		c.Detail = fmt.Sprint(detail)
	}
	return c
}

// startProfile starts a CPU profile of the phase in profiling mode and
// returns its stop function.
func (h *harness) startProfile(name string) func() {
	if h.o.profile == "" {
		return func() {}
	}
	path := filepath.Join(h.o.profile, fmt.Sprintf("cpu-n%d-%s.pprof", h.o.shape.proxies, slug(name)))
	f, err := os.Create(path)
	if err != nil {
		h.log.Warn("CPU profile", "err", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		h.log.Warn("CPU profile", "err", err)
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// writeProfile writes a runtime/pprof profile (heap, allocs) in profiling
// mode. The allocs profiles before and after a phase give, with pprof
// -diff_base, what the phase allocated.
func (h *harness) writeProfile(kind, name string) {
	if h.o.profile == "" {
		return
	}
	path := filepath.Join(h.o.profile, fmt.Sprintf("%s-n%d-%s.pprof", kind, h.o.shape.proxies, name))
	f, err := os.Create(path)
	if err == nil {
		err = pprof.Lookup(kind).WriteTo(f, 0)
		f.Close()
	}
	if err != nil {
		h.log.Warn("profile", "kind", kind, "err", err)
	}
}

func (h *harness) closeProxies() {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, p := range append(h.proxies, h.extra) {
		if p == nil {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			p.close()
			<-sem
		})
	}
	wg.Wait()
}

// firstReceiptOf returns when version first arrived.
func firstReceiptOf(rs []receipt, version string) (time.Time, bool) {
	for _, r := range rs {
		if r.version == version {
			return r.at, true
		}
	}
	return time.Time{}, false
}

func selfSample() procSample {
	s, _ := readProc(os.Getpid())
	return s
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return errors.Join(errors.New("interrupted"), ctx.Err())
	case <-t.C:
		return nil
	}
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
