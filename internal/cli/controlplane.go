package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

func newControlPlaneCommand() *cobra.Command {
	var (
		configFile string
		initCA     bool
		kube       kubeFlags
	)
	cmd := &cobra.Command{
		Use:   "control-plane",
		Short: "Run the control plane: CA, identity and discovery services, registry, admin API",
		Long: `Run the control plane. Proxies connect to its listen address to obtain
certificates (identity service) and their configuration (discovery service);
the CLI reads its admin API. The configuration file (kind: ControlPlane)
declares the workloads and services; the resources directory it names holds
PeerAuthentication and AuthorizationPolicy files and is watched: a valid
change is pushed to the proxies it concerns, an invalid one is rejected
whole and reported by 'trellis status'.

With --kubernetes, a cluster declares the workloads (pods injected with the
sidecar) and services, its custom resources (trellis install) replace the
resources directory, proxies prove their pod's service account with a
projected token, and the control plane serves the sidecar injector webhook.`,
		Example: `  trellis control-plane --config mesh/control-plane.yaml --init
  trellis status --state-dir mesh/.trellis --wait
  trellis control-plane --config cp.yaml --init --kubernetes --kubeconfig ~/.kube/config \
    --webhook-listen 127.0.0.1:15017 --webhook-url auto`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := controlplane.LoadConfig(configFile)
			if err != nil {
				return err
			}
			opts := controlplane.Options{Config: cfg, Log: logger(cmd), Init: initCA}
			if kube.enabled {
				if opts.Kubernetes, err = kube.connect(cfg.TrustDomain); err != nil {
					return err
				}
			} else if f := kube.given(cmd); f != "" {
				return fmt.Errorf("--%s needs --kubernetes", f)
			}
			cp, err := controlplane.New(opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Control plane for %s: proxies connect to %s, admin API at https://%s (state in %s)\n",
				cfg.TrustDomain, cp.Addr(), cp.AdminAddr(), cfg.StateDir)
			return cp.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "control plane configuration file (kind: ControlPlane)")
	cmd.Flags().BoolVar(&initCA, "init", false, "create the CA if the state directory has none")
	kube.add(cmd)
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

func newStatusCommand() *cobra.Command {
	var (
		mesh              meshFlags
		adminAddr, output string
		wait              bool
		timeout           time.Duration
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every proxy, the configuration version it runs, and configuration errors",
		Long: `Show the control plane's view of the mesh: each proxy with its workload,
identity, certificate expiry, the configuration version it has acknowledged
against the current one, and when it last checked in; and whether the last
change to the resource directory was rejected, with file and field.

With --wait, block until every connected proxy runs its current version
(this makes a PERMISSIVE → STRICT change safe to script).`,
		Example: `  trellis status
  trellis status -f examples/zero-trust/mesh.yaml --wait --timeout 30s
  trellis status -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: use text or json", output)
			}
			client, err := controlplane.Dial(mesh.dir(cmd), adminAddr)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if wait {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			var st controlplane.Status
			if wait {
				// Changes written just before this command must count.
				st, err = client.Sync(ctx)
			} else {
				st, err = client.Status(ctx)
			}
			for wait && err == nil && !st.Converged {
				if rejected := rejectedBy(st); len(rejected) > 0 {
					printStatus(cmd.OutOrStdout(), st, output)
					return fmt.Errorf("%s rejected the current configuration (see the table above); it keeps running the previous one", strings.Join(rejected, ", "))
				}
				select {
				case <-ctx.Done():
					printStatus(cmd.OutOrStdout(), st, output)
					return fmt.Errorf("not every proxy runs its current configuration after %v (see the table above)", timeout)
				case <-time.After(200 * time.Millisecond):
				}
				st, err = client.Status(ctx)
			}
			if err != nil {
				return err
			}
			printStatus(cmd.OutOrStdout(), st, output)
			if len(st.Resources.Error) > 0 && wait {
				return fmt.Errorf("the last change to %s was rejected; the proxies run the previous configuration", st.Resources.Directory)
			}
			return nil
		},
	}
	mesh.add(cmd)
	cmd.Flags().StringVar(&adminAddr, "admin-addr", "", "admin API address (default: read from the state directory)")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until every connected proxy runs its current configuration")
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long --wait waits")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

// rejectedBy lists the connected proxies that NACKed their current version:
// waiting for them is pointless.
func rejectedBy(st controlplane.Status) []string {
	var out []string
	for _, p := range st.Proxies {
		if p.Connected && p.Rejected != "" && p.RejectedVersion == p.CurrentVersion {
			out = append(out, p.Instance)
		}
	}
	return out
}

func printStatus(w io.Writer, st controlplane.Status, output string) {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st)
		return
	}
	res := st.Resources
	fmt.Fprintf(w, "Configuration: version %s (generation %d)", res.Version, st.Generation)
	if res.Directory != "" {
		fmt.Fprintf(w, " from %s", res.Directory)
	}
	fmt.Fprintln(w)
	if len(res.Error) > 0 {
		fmt.Fprintf(w, "REJECTED change at %s; the previous configuration stays in force:\n", res.RejectedAt.Format(time.RFC3339))
		for _, e := range res.Error {
			fmt.Fprintf(w, "  %s\n", formatResourceError(e))
		}
	}
	for _, e := range res.Warnings {
		fmt.Fprintf(w, "  warning: %s\n", formatResourceError(e))
	}
	now := time.Now()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPROXY\tIDENTITY\tCERT EXPIRES\tACKED\tCURRENT\tSYNC\tLAST SEEN")
	for _, p := range st.Proxies {
		sync := "yes"
		switch {
		case !p.Connected:
			sync = "disconnected " + ago(now, p.DisconnectedAt)
		case p.Rejected != "" && p.RejectedVersion == p.CurrentVersion:
			sync = "REJECTED: " + p.Rejected
		case !p.InSync:
			sync = "pending"
		}
		expires := "-"
		if !p.CertificateExpiry.IsZero() {
			expires = "in " + p.CertificateExpiry.Sub(now).Round(time.Second).String()
		}
		lastSeen := "-"
		if !p.LastSeen.IsZero() {
			lastSeen = ago(now, p.LastSeen)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Instance, p.Identity, expires, orDash(p.AckedVersion), orDash(p.CurrentVersion), sync, lastSeen)
	}
	tw.Flush()
	if len(st.Proxies) == 0 {
		fmt.Fprintln(w, "(no proxy has connected)")
	}
	if st.Converged {
		fmt.Fprintln(w, "\nEvery connected proxy runs its current configuration.")
	} else {
		fmt.Fprintln(w, "\nSome proxies do not run their current configuration yet.")
	}
}

func formatResourceError(e controlplane.ResourceError) string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		if e.Line > 0 {
			fmt.Fprintf(&b, ":%d", e.Line)
		}
		b.WriteString(": ")
	}
	if e.Resource != "" {
		b.WriteString(e.Resource + ": ")
	}
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

func ago(now, t time.Time) string {
	return now.Sub(t).Round(time.Second).String() + " ago"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
