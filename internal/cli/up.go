package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/localrun"
	"github.com/trellis-mesh/trellis/internal/meshfile"
)

// meshFlags locate a running mesh: its state directory, given directly or
// as the .trellis directory beside its mesh file.
type meshFlags struct {
	stateDir, file string
}

func (f *meshFlags) add(cmd *cobra.Command) {
	addStateDirFlag(cmd, &f.stateDir)
	cmd.Flags().StringVarP(&f.file, "file", "f", "", "mesh file: use the state directory beside it")
}

func (f *meshFlags) dir(cmd *cobra.Command) string {
	if f.file != "" && !cmd.Flags().Changed("state-dir") {
		return filepath.Join(filepath.Dir(f.file), defaultStateDir)
	}
	return f.stateDir
}

func newUpCommand() *cobra.Command {
	var (
		file, stateDir, proxyBin string
	)
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run a whole mesh on this machine: control plane, workloads and their sidecars",
		Long: `Run the mesh a mesh file (kind: Mesh) describes, in the foreground: the
control plane in-process, then every replica of every workload with its
sidecar. Ctrl-C (or 'trellis down') stops everything in order and removes
what was created.

isolation: netns (Linux, root) gives each replica its own network namespace
with the interception rules of a Kubernetes init container, services
resolvable by name. isolation: process (no root) runs plain processes on
loopback that reach services through their sidecar: HTTP_PROXY, and upstream
ports named in their environment.`,
		Example: `  sudo trellis up -f examples/zero-trust/mesh.yaml
  trellis up -f examples/no-root/mesh.yaml
  trellis up -f mesh.yaml --state-dir /var/lib/trellis`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := meshfile.Load(file)
			if err != nil {
				return err
			}
			if !cmd.Flags().Changed("state-dir") {
				stateDir = filepath.Join(m.Dir, defaultStateDir)
			}
			if proxyBin == "" {
				if proxyBin, err = findProxy(); err != nil {
					return err
				}
			}
			// A closed terminal (SIGHUP) stops the mesh in order, like
			// Ctrl-C; a closed output pipe must not kill up mid-stop.
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGHUP)
			defer stop()
			signal.Ignore(syscall.SIGPIPE)
			return localrun.Run(ctx, localrun.Options{
				Mesh: m, MeshFile: file, StateDir: stateDir, ProxyBinary: proxyBin, Log: logger(cmd), Out: cmd.OutOrStdout(),
			})
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "mesh.yaml", "mesh file (kind: Mesh)")
	addStateDirFlag(cmd, &stateDir)
	cmd.Flags().Lookup("state-dir").Usage = "state directory (default: .trellis beside the mesh file)"
	cmd.Flags().StringVar(&proxyBin, "proxy-binary", "", "trellis-proxy executable (default: beside trellis, else on PATH)")
	return cmd
}

// findProxy looks for trellis-proxy beside this executable, then on PATH.
func findProxy() (string, error) {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "trellis-proxy")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("trellis-proxy"); err == nil {
		return filepath.Abs(p)
	}
	return "", errors.New("trellis-proxy not found beside trellis or on PATH: build it (go build ./cmd/trellis-proxy) or give --proxy-binary")
}

func newDownCommand() *cobra.Command {
	var f meshFlags
	cmd := &cobra.Command{
		Use:     "down",
		Short:   "Stop the mesh 'trellis up' runs, as Ctrl-C would",
		Example: "  trellis down -f examples/zero-trust/mesh.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := localrun.ReadState(f.dir(cmd))
			if err != nil {
				return err
			}
			if !localrun.Running(f.dir(cmd)) {
				// up died without stopping what it started.
				if err := localrun.CleanupStopped(f.dir(cmd), logger(cmd)); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "The mesh was not running; removed what it had left behind.")
				return nil
			}
			// The record is up's own while it holds the lock.
			if err := syscall.Kill(st.PID, syscall.SIGINT); err != nil {
				return fmt.Errorf("signal trellis up (pid %d): %w", st.PID, err)
			}
			// up removes its record last, after the network.
			deadline := time.Now().Add(time.Minute)
			for time.Now().Before(deadline) {
				if _, err := localrun.ReadState(f.dir(cmd)); err != nil {
					fmt.Fprintln(cmd.OutOrStdout(), "The mesh is stopped.")
					return nil
				}
				time.Sleep(100 * time.Millisecond)
			}
			return fmt.Errorf("trellis up (pid %d) did not stop within a minute", st.PID)
		},
	}
	f.add(cmd)
	return cmd
}

// replicasOf finds the running replicas of NAMESPACE/NAME: the one of
// index, or all of them when index is negative.
func replicasOf(cmd *cobra.Command, f *meshFlags, ref string, index int) ([]localrun.Replica, error) {
	if !strings.Contains(ref, "/") {
		return nil, fmt.Errorf("%q: name the workload as NAMESPACE/NAME", ref)
	}
	st, err := localrun.ReadState(f.dir(cmd))
	if err != nil {
		return nil, err
	}
	var names []string
	var out []localrun.Replica
	for _, r := range st.Replicas {
		if r.Workload == ref && (index < 0 || r.Index == index) {
			out = append(out, r)
		}
		if !slices.Contains(names, r.Workload) {
			names = append(names, r.Workload)
		}
	}
	if len(out) == 0 {
		what := "workload " + ref
		if index >= 0 {
			what = fmt.Sprintf("replica %d of workload %s", index, ref)
		}
		return nil, fmt.Errorf("no %s in this mesh (it runs %s)", what, strings.Join(names, ", "))
	}
	return out, nil
}

func newExecCommand() *cobra.Command {
	var (
		f       meshFlags
		replica int
	)
	cmd := &cobra.Command{
		Use:   "exec NAMESPACE/NAME -- COMMAND [ARG...]",
		Short: "Run a command as a workload would: in its network namespace, or with its environment",
		Long: `Run a command from a workload's point of view: under netns isolation inside
the network namespace of one of its replicas (calls go through its sidecar's
interception); under process isolation with the environment its program has
(HTTP_PROXY pointing at its sidecar, the services' upstream ports).`,
		Example: `  trellis exec default/checkout -- curl -sS -X POST http://orders-api.shipping/v1/orders
  trellis exec shipping/orders-api --replica 1 -- curl -sS 127.0.0.1:15000/config`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if replica < 0 {
				return fmt.Errorf("--replica %d: give a replica's index, 0 or more", replica)
			}
			reps, err := replicasOf(cmd, &f, args[0], replica)
			if err != nil {
				return err
			}
			rep := reps[0]
			var c *exec.Cmd
			if rep.Netns != "" {
				c = exec.CommandContext(cmd.Context(), "ip", append([]string{"netns", "exec", rep.Netns}, args[1:]...)...)
			} else {
				// Process isolation: the workload's view is its
				// environment (its sidecar as HTTP proxy, its upstream
				// ports).
				c = exec.CommandContext(cmd.Context(), args[1], args[2:]...)
				c.Env = append(os.Environ(), rep.Env...)
			}
			c.Stdin, c.Stdout, c.Stderr = cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr()
			if err := c.Run(); err != nil {
				var exit *exec.ExitError
				if errors.As(err, &exit) {
					return &ExitError{Code: exit.ExitCode()}
				}
				return err
			}
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().IntVar(&replica, "replica", 0, "which replica")
	return cmd
}

// ExitError carries a command's exit status out of 'trellis exec'.
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

func newLogsCommand() *cobra.Command {
	var (
		f       meshFlags
		replica int
		proxy   bool
	)
	cmd := &cobra.Command{
		Use:   "logs NAMESPACE/NAME",
		Short: "Show the output of a workload's program and of its sidecar, for every replica",
		Example: `  trellis logs shipping/orders-api
  trellis logs shipping/orders-api --replica 1 --proxy`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			reps, err := replicasOf(cmd, &f, args[0], replica)
			if err != nil {
				return err
			}
			var files []string
			for _, rep := range reps {
				if !proxy {
					files = append(files, rep.AppLog)
				}
				files = append(files, rep.ProxyLog)
			}
			for _, path := range files {
				if path == "" {
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "==> %s <==\n", path)
				if err := copyFile(cmd.OutOrStdout(), path); err != nil {
					return err
				}
			}
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().IntVar(&replica, "replica", -1, "only this replica (default: all)")
	cmd.Flags().BoolVar(&proxy, "proxy", false, "only the sidecars' logs")
	return cmd
}

func copyFile(w io.Writer, path string) error {
	fh, err := os.Open(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	_, err = io.Copy(w, fh)
	return err
}
