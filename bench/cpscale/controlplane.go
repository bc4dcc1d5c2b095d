package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

// controlPlane is the control plane under measurement: a child process
// (its /proc figures are its own) or, for profiling, running inside this
// process (its figures include the simulated proxies).
type controlPlane struct {
	pid       int
	inProcess bool
	stateDir  string
	addr      string // where proxies connect
	admin     *controlplane.Client
	stop      func() error
}

// startupTimeout bounds how long the control plane may take to serve.
const startupTimeout = 30 * time.Second

// startChild runs `trellis control-plane --config cfgPath --init` and waits
// until it serves. Its output goes to logPath.
func startChild(ctx context.Context, binary, cfgPath, stateDir, logPath string) (*controlPlane, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(binary, "control-plane", "--config", cfgPath, "--init")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: a Ctrl-C in the terminal reaches only
		// the harness, which stops the child in order.
		Setpgid: true,
		// Should the harness die without cleaning up, so does the child.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", binary, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		logFile.Close()
		close(exited)
	}()
	stop := func() error {
		select {
		case <-exited:
			return nil
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			return nil
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return errors.New("the control plane did not stop within 10s of SIGTERM; killed")
		}
	}
	cp := &controlPlane{pid: cmd.Process.Pid, stateDir: stateDir, stop: stop}
	if err := cp.waitServing(ctx, exited, func() error {
		return fmt.Errorf("the control plane exited (%v); its log %s ends with:\n%s", waitErr, logPath, tail(logPath, 10))
	}); err != nil {
		_ = stop()
		return nil, err
	}
	return cp, nil
}

// startInProcess runs the control plane in this process, for profiling.
func startInProcess(ctx context.Context, cfgPath, logPath string, log *slog.Logger) (*controlPlane, error) {
	cfg, err := controlplane.LoadConfig(cfgPath)
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cpLog := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo}))
	inst, err := controlplane.New(controlplane.Options{Config: cfg, Log: cpLog, Init: true})
	if err != nil {
		logFile.Close()
		return nil, err
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inst.Run(runCtx) }()
	exited := make(chan struct{})
	var runErr error
	go func() {
		runErr = <-done
		logFile.Close()
		close(exited)
	}()
	stop := func() error {
		cancel()
		select {
		case <-exited:
			return runErr
		case <-time.After(10 * time.Second):
			return errors.New("the in-process control plane did not stop within 10s")
		}
	}
	cp := &controlPlane{pid: os.Getpid(), inProcess: true, stateDir: cfg.StateDir, stop: stop}
	if err := cp.waitServing(ctx, exited, func() error { return fmt.Errorf("the control plane stopped: %v", runErr) }); err != nil {
		_ = stop()
		return nil, err
	}
	log.Info("control plane running in this process (profiling mode: /proc figures include the simulated proxies)")
	return cp, nil
}

// waitServing waits for the control plane's endpoints file and a first
// answer of its admin API.
func (cp *controlPlane) waitServing(ctx context.Context, exited <-chan struct{}, exitErr func() error) error {
	deadline := time.Now().Add(startupTimeout)
	path := filepath.Join(cp.stateDir, controlplane.EndpointsFile)
	for {
		if data, err := os.ReadFile(path); err == nil {
			var ep controlplane.Endpoints
			if json.Unmarshal(data, &ep) == nil && ep.PID == cp.pid && ep.Proxies != "" {
				cp.addr = ep.Proxies
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the control plane did not write %s within %v", path, startupTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return exitErr()
		case <-time.After(50 * time.Millisecond):
		}
	}
	admin, err := controlplane.Dial(cp.stateDir, "")
	if err != nil {
		return fmt.Errorf("admin API: %w", err)
	}
	cp.admin = admin
	for {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := admin.Status(sctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the control plane's admin API does not answer: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return exitErr()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// sample reads the control plane's /proc figures.
func (cp *controlPlane) sample() procSample {
	s, err := readProc(cp.pid)
	if err != nil {
		return procSample{}
	}
	return s
}

// status reads the admin API with a generous timeout: at 10,000 proxies
// the answer is several megabytes.
func (cp *controlPlane) status(ctx context.Context) (controlplane.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return cp.admin.Status(ctx)
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
