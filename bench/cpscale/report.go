package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// result is one run, as written to result-nN.json.
type result struct {
	Proxies    int           `json:"proxies"`
	Workloads  int           `json:"workloads"`
	Namespaces int           `json:"namespaces"`
	Endpoints  bool          `json:"endpoints"`
	InProcess  bool          `json:"inProcess"`
	Machine    machineInfo   `json:"machine"`
	Started    time.Time     `json:"started"`
	Connect    connectResult `json:"connect"`
	Memory     memoryResult  `json:"memory"`
	Phases     []phaseResult `json:"phases"`
	CPU        struct {
		// ControlPlaneSeconds is utime+stime of the control plane from
		// before the first proxy connected to the end.
		ControlPlaneSeconds float64 `json:"controlPlaneSeconds"`
		// HarnessSeconds is this process's (the simulated proxies') CPU
		// over the same time.
		HarnessSeconds float64 `json:"harnessSeconds"`
	} `json:"cpu"`
	FinalCheck check          `json:"finalCheck"`
	Targets    []targetResult `json:"targets"`
}

type connectResult struct {
	// Seconds to open every stream (TLS handshake, Hello sent).
	Seconds float64 `json:"seconds"`
	// ConvergedSeconds from the first connection until the last proxy
	// received its final version.
	ConvergedSeconds float64  `json:"convergedSeconds"`
	Failed           int      `json:"failed"`
	Errors           []string `json:"errors,omitempty"`
	// Updates received by all proxies while connecting (every
	// registration changes every proxy's destinations).
	Updates                int     `json:"updates"`
	ControlPlaneCPUSeconds float64 `json:"controlPlaneCPUSeconds"`
}

type memoryResult struct {
	// IdleRSSKB is VmRSS serving, before any proxy connected.
	IdleRSSKB int64 `json:"idleRSSKB"`
	// ConvergedRSSKB is VmRSS when every proxy had converged.
	ConvergedRSSKB int64 `json:"convergedRSSKB"`
	// SteadyRSSKB is VmRSS after the settle time that followed.
	SteadyRSSKB int64 `json:"steadyRSSKB"`
	// PerProxyKB = (SteadyRSSKB - IdleRSSKB) / connected proxies.
	PerProxyKB float64 `json:"perProxyKB"`
	// PeakRSSKB is the highest VmHWM: of the connection ramp, then of
	// every phase.
	PeakRSSKB int64 `json:"peakRSSKB"`
	// RampPeakRSSKB is VmHWM after connecting and settling.
	RampPeakRSSKB int64 `json:"rampPeakRSSKB"`
	EndRSSKB      int64 `json:"endRSSKB"`
	// HeapPerProxyKB is the growth of the Go heap in use per proxy, after
	// a GC (profiling mode only: the control plane in this process).
	HeapPerProxyKB float64 `json:"heapPerProxyKB,omitempty"`
	// HeapPerProxyKBNoPools is the same after three GCs, which empty the
	// buffer pools.
	HeapPerProxyKBNoPools float64 `json:"heapPerProxyKBNoPools,omitempty"`
	// HeapPerProxyKBEnd is the same at the end of the run: growth over
	// the phases would be a leak.
	HeapPerProxyKBEnd float64 `json:"heapPerProxyKBEnd,omitempty"`
}

type phaseResult struct {
	Name   string `json:"name"`
	Change string `json:"change"`
	// Expected proxies the change concerns; Pushed of them received an
	// update, Converged received the version they ended with (the
	// control plane's current one when Check agrees).
	Expected  int `json:"expected"`
	Pushed    int `json:"pushed"`
	Converged int `json:"converged"`
	// Unexpected proxies, outside the change's scope, received an update.
	Unexpected int  `json:"unexpected"`
	TimedOut   bool `json:"timedOut,omitempty"`
	// Updates received by every proxy (including the extra instance).
	Updates      int `json:"updates"`
	StreamErrors int `json:"streamErrors,omitempty"`
	// UpdateBytes is the largest update's encoded size.
	UpdateBytes int `json:"updateBytes"`
	// Destinations and Endpoints in proxy p00000's last update.
	Destinations int `json:"destinations"`
	Endpoints    int `json:"endpoints"`
	// Latency from the change to each concerned proxy's receipt of its
	// new version, in milliseconds.
	P50ms float64 `json:"p50ms"`
	P99ms float64 `json:"p99ms"`
	MaxMs float64 `json:"maxMs"`
	// ControlPlaneCPUSeconds is utime+stime over the phase (from the
	// change until the phase's quiet period ended); Sched is the same
	// from schedstat, at nanosecond resolution.
	ControlPlaneCPUSeconds   float64 `json:"controlPlaneCPUSeconds"`
	ControlPlaneSchedSeconds float64 `json:"controlPlaneSchedSeconds"`
	CPUPerUpdateUs           float64 `json:"cpuPerUpdateUs"`
	HarnessCPUSeconds        float64 `json:"harnessCPUSeconds"`
	// StartRSSKB is the control plane's VmRSS when the change was made;
	// PeakRSSKB its VmHWM over the phase (reset through
	// /proc/PID/clear_refs at the start; 0 when that failed).
	StartRSSKB int64 `json:"startRSSKB"`
	PeakRSSKB  int64 `json:"peakRSSKB"`
	// Check is the admin API's view once the phase ended.
	Check check `json:"check"`
}

// check is what the admin API said.
type check struct {
	// Agrees: the control plane reports converged, and every simulated
	// proxy is connected, in sync, and received the version the control
	// plane says is its current one.
	Agrees     bool   `json:"agrees"`
	Converged  bool   `json:"converged"`
	Connected  int    `json:"connected"`
	Mismatched int    `json:"mismatched"`
	Detail     string `json:"detail,omitempty"`
}

type targetResult struct {
	What string `json:"what"`
	Met  bool   `json:"met"`
}

// percentiles returns p50, p99 and the maximum in milliseconds, by the
// nearest-rank method; zeros for no samples.
func percentiles(d []time.Duration) (p50, p99, mx float64) {
	if len(d) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p/100*float64(len(s)))) - 1
		return ms(s[max(i, 0)])
	}
	return rank(50), rank(99), ms(s[len(s)-1])
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

// convergenceTarget is the target for n proxies: every proxy
// within 1 s at 1,000, within 5 s at 10,000.
func convergenceTarget(n int) (time.Duration, bool) {
	switch {
	case n <= 1000:
		return time.Second, true
	case n <= 10000:
		return 5 * time.Second, true
	}
	return 0, false
}

const memoryTargetKB = 200

func targets(r *result) []targetResult {
	var out []targetResult
	if t, ok := convergenceTarget(r.Proxies); ok {
		for _, p := range r.Phases {
			met := !p.TimedOut && p.Converged == p.Expected && p.Unexpected == 0 && p.Check.Agrees &&
				p.MaxMs <= float64(t.Milliseconds())
			out = append(out, targetResult{
				What: fmt.Sprintf("%s: every concerned proxy (%d) within %v: max %.0f ms", p.Name, p.Expected, t, p.MaxMs),
				Met:  met,
			})
		}
	}
	if !r.InProcess {
		out = append(out, targetResult{
			What: fmt.Sprintf("control plane memory per connected proxy %.1f KB < %d KB", r.Memory.PerProxyKB, memoryTargetKB),
			Met:  r.Memory.PerProxyKB < memoryTargetKB,
		})
	}
	return out
}

// writeResults writes result-nN.json and table-nN.md into the result
// directory and prints the table.
func writeResults(o options, r *result, stdout io.Writer) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	base := filepath.Join(o.out, fmt.Sprintf("result-n%d", r.Proxies))
	if err := os.WriteFile(base+".json", append(data, '\n'), 0o644); err != nil {
		return err
	}
	var b strings.Builder
	table(&b, r)
	if err := os.WriteFile(filepath.Join(o.out, fmt.Sprintf("table-n%d.md", r.Proxies)), []byte(b.String()), 0o644); err != nil {
		return err
	}
	_, err = io.WriteString(stdout, b.String())
	return err
}

// table writes a run's summary as markdown.
func table(w io.Writer, r *result) {
	mode := "child process"
	if r.InProcess {
		mode = "in-process (profiling; /proc figures include the simulated proxies)"
	}
	fmt.Fprintf(w, "N=%d proxies over %d workloads in %d namespaces (endpoints registered: %v); control plane: %s\n\n",
		r.Proxies, r.Workloads, r.Namespaces, r.Endpoints, mode)
	c := r.Connect
	fmt.Fprintf(w, "Connect: %d streams open in %.1f s (%d failed), all converged %.1f s after the first connection; %d updates pushed meanwhile, control plane CPU %.1f s\n\n",
		r.Proxies-c.Failed, c.Seconds, c.Failed, c.ConvergedSeconds, c.Updates, c.ControlPlaneCPUSeconds)
	for _, e := range c.Errors {
		fmt.Fprintf(w, "- connection error: %s\n", e)
	}
	m := r.Memory
	fmt.Fprintf(w, "Memory (VmRSS): idle %.1f MB, all converged %.1f MB, after settling %.1f MB → %.1f KB per proxy; peak while connecting (VmHWM) %.1f MB, over the run %.1f MB; at the end %.1f MB",
		mb(m.IdleRSSKB), mb(m.ConvergedRSSKB), mb(m.SteadyRSSKB), m.PerProxyKB, mb(m.RampPeakRSSKB), mb(m.PeakRSSKB), mb(m.EndRSSKB))
	if m.HeapPerProxyKB != 0 {
		fmt.Fprintf(w, "; Go heap in use (simulated proxies included) %.1f KB per proxy after a GC, %.1f KB once the buffer pools are emptied, %.1f KB at the end", m.HeapPerProxyKB, m.HeapPerProxyKBNoPools, m.HeapPerProxyKBEnd)
	}
	fmt.Fprint(w, "\n\n")
	fmt.Fprintln(w, "| N | phase | proxies pushed / concerned | others pushed | update size (KB) | endpoints | p50 (ms) | p99 (ms) | max (ms) | CP CPU (s) | CPU µs/update | CP RSS MB before → peak | harness CPU (s) | admin API agrees |")
	fmt.Fprintln(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, p := range r.Phases {
		agree := "yes"
		if !p.Check.Agrees {
			agree = "NO: " + p.Check.Detail
		}
		if p.TimedOut {
			agree += " (timed out)"
		}
		peak := "-"
		if p.PeakRSSKB > 0 {
			peak = fmt.Sprintf("%.0f", mb(p.PeakRSSKB))
		}
		fmt.Fprintf(w, "| %d | %s | %d / %d | %d | %.1f | %d | %.0f | %.0f | %.0f | %.2f | %.0f | %.0f → %s | %.2f | %s |\n",
			r.Proxies, p.Name, p.Pushed, p.Expected, p.Unexpected, float64(p.UpdateBytes)/1024, p.Endpoints,
			p.P50ms, p.P99ms, p.MaxMs, p.ControlPlaneCPUSeconds, p.CPUPerUpdateUs, mb(p.StartRSSKB), peak, p.HarnessCPUSeconds, agree)
	}
	fmt.Fprintf(w, "\nControl plane CPU over the run: %.1f s (simulated proxies: %.1f s). Final check: ", r.CPU.ControlPlaneSeconds, r.CPU.HarnessSeconds)
	if r.FinalCheck.Agrees {
		fmt.Fprintf(w, "the control plane reports every one of the %d connected proxies in sync.\n", r.FinalCheck.Connected)
	} else {
		fmt.Fprintf(w, "NOT in agreement: %s\n", r.FinalCheck.Detail)
	}
	if len(r.Targets) > 0 {
		fmt.Fprint(w, "\nTargets:\n\n")
		for _, t := range r.Targets {
			met := "met"
			if !t.Met {
				met = "NOT met"
			}
			fmt.Fprintf(w, "- %s: %s\n", t.What, met)
		}
	}
}

func mb(kb int64) float64 { return float64(kb) / 1024 }

var nonWord = regexp.MustCompile(`[^a-z0-9]+`)

func slug(s string) string {
	return strings.Trim(nonWord.ReplaceAllString(strings.ToLower(s), "-"), "-")
}
