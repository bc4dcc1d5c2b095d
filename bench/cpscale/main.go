// Command cpscale measures how the Trellis control plane scales with the
// number of connected proxies. It starts the real `trellis control-plane`
// as a child process (so that its memory and CPU, read from /proc, are its
// own), connects N simulated proxies to it over real gRPC and mutual TLS —
// each with its own connection, as separate proxies have — and measures:
//
//   - how long a change takes to reach every proxy it concerns: a
//     namespace's AuthorizationPolicy, a mesh-wide one, an instance
//     registering and the same instance saying goodbye (p50/p99/max from
//     the change to each proxy's receipt of the update carrying its new
//     version, by the proxies' own clocks, confirmed through the admin API);
//   - the control plane's resident memory per connected proxy;
//   - the control plane's CPU per update pushed.
//
// See bench/README.md ("Control plane: push convergence and memory per
// proxy") for how to run it and read it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// options are the command-line flags.
type options struct {
	shape          meshShape
	trellis        string
	out            string
	concurrency    int
	connectTimeout time.Duration
	dialTimeout    time.Duration
	phaseTimeout   time.Duration
	quiet          time.Duration
	settle         time.Duration
	profile        string
	keep           bool
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("cpscale", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, `Usage: cpscale -trellis PATH [flags]

Connects -n simulated proxies to a trellis control plane started from PATH,
changes a policy and an endpoint, and reports how long every proxy took to
receive the change, and the control plane's memory and CPU.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.IntVar(&o.shape.proxies, "n", 1000, "simulated proxies")
	fs.IntVar(&o.shape.workloads, "workloads", 100, "declared workloads (one service each); proxies are spread over them")
	fs.IntVar(&o.shape.namespaces, "namespaces", 10, "namespaces the workloads are spread over")
	fs.BoolVar(&o.shape.endpoints, "endpoints", true, "every proxy registers its workload port, so every service has endpoints (as in a real mesh); false: proxies register none")
	fs.StringVar(&o.trellis, "trellis", "", "the trellis binary to run as control plane (required unless -profile)")
	fs.StringVar(&o.out, "out", ".", "directory for the results (result-nN.json, table-nN.md, the control plane's log)")
	fs.IntVar(&o.concurrency, "concurrency", 64, "proxies connecting at once")
	fs.DurationVar(&o.connectTimeout, "connect-timeout", 10*time.Minute, "deadline for connecting every proxy and their first convergence")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", time.Minute, "deadline for one proxy's connection")
	fs.DurationVar(&o.phaseTimeout, "phase-timeout", 3*time.Minute, "deadline for one change to reach every proxy")
	fs.DurationVar(&o.quiet, "quiet", time.Second, "a phase ends when every affected proxy has an update and none arrived for this long")
	fs.DurationVar(&o.settle, "settle", 10*time.Second, "wait after the first convergence before reading the control plane's memory")
	fs.StringVar(&o.profile, "profile", "", "profiling mode: run the control plane inside this process and write CPU and heap profiles to this directory (/proc figures then include the proxies)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (configuration, state, resources)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := o.shape.validate(); err != nil {
		return o, err
	}
	if o.trellis == "" && o.profile == "" {
		return o, errors.New("-trellis is required: build it with go build -o PATH ./cmd/trellis")
	}
	if o.concurrency < 1 {
		return o, errors.New("-concurrency must be at least 1")
	}
	return o, nil
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cpscale:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	err = run(ctx, o, log, os.Stdout)
	interrupted := ctx.Err() != nil
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cpscale:", err)
		if interrupted {
			os.Exit(130)
		}
		os.Exit(1)
	}
}

// run sets the mesh up, measures, and tears it down, also on error or
// interruption.
func run(ctx context.Context, o options, log *slog.Logger, stdout io.Writer) (err error) {
	if o.trellis != "" && o.profile == "" {
		if o.trellis, err = filepath.Abs(o.trellis); err != nil {
			return err
		}
		if _, err := os.Stat(o.trellis); err != nil {
			return fmt.Errorf("-trellis: %w", err)
		}
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	if o.profile != "" {
		if err := os.MkdirAll(o.profile, 0o755); err != nil {
			return err
		}
	}
	work, err := os.MkdirTemp("", "trellis-cpscale-")
	if err != nil {
		return err
	}
	defer func() {
		if o.keep {
			log.Info("kept the temporary directory", "dir", work)
			return
		}
		if rerr := os.RemoveAll(work); rerr != nil && err == nil {
			err = rerr
		}
	}()
	cfgPath := filepath.Join(work, "control-plane.yaml")
	if err := os.Mkdir(filepath.Join(work, "resources"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(cfgPath, []byte(o.shape.controlPlaneConfig()), 0o644); err != nil {
		return err
	}
	stateDir := filepath.Join(work, "state")
	logPath := filepath.Join(o.out, fmt.Sprintf("control-plane-n%d.log", o.shape.proxies))

	var cp *controlPlane
	if o.profile != "" {
		cp, err = startInProcess(ctx, cfgPath, logPath, log)
	} else {
		cp, err = startChild(ctx, o.trellis, cfgPath, stateDir, logPath)
	}
	if err != nil {
		return err
	}
	log.Info("control plane serving", "pid", cp.pid, "proxies", cp.addr, "log", logPath)

	h := &harness{o: o, log: log, cp: cp, work: work, resources: filepath.Join(work, "resources")}
	defer func() {
		// Stop the control plane first: it ends every stream, so the
		// proxies' connections close without errors to report.
		if serr := cp.stop(); serr != nil && err == nil {
			err = serr
		}
		h.closeProxies()
	}()
	res, err := h.measure(ctx)
	if res != nil {
		if werr := writeResults(o, res, stdout); werr != nil && err == nil {
			err = werr
		}
	}
	return err
}

// machineInfo describes where the figures were taken.
type machineInfo struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpuModel"`
	MemoryGiB int    `json:"memoryGiB"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"goVersion"`
}

func machine() machineInfo {
	m := machineInfo{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int
		if _, err := fmt.Sscanf(string(data), "MemTotal: %d kB", &kb); err == nil {
			m.MemoryGiB = (kb + 1<<19) >> 20
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	return m
}
