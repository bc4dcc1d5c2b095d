package cli

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/meshcheck"
	"github.com/trellis-mesh/trellis/internal/telemetry"
)

// trafficFlags are the flags of the commands that read the traffic view.
type trafficFlags struct {
	mesh              meshFlags
	adminAddr, output string
	namespace         string
	window            time.Duration
}

func (f *trafficFlags) add(cmd *cobra.Command) {
	f.mesh.add(cmd)
	cmd.Flags().StringVar(&f.adminAddr, "admin-addr", "", "admin API address (default: read from the state directory)")
	cmd.Flags().StringVarP(&f.output, "output", "o", "text", "output format: text or json")
	cmd.Flags().StringVarP(&f.namespace, "namespace", "n", "", "only this namespace")
	cmd.Flags().DurationVarP(&f.window, "window", "w", time.Minute, fmt.Sprintf("how far back to measure (at most %s)", controlplane.MaxTrafficWindow))
}

func (f *trafficFlags) fetch(cmd *cobra.Command) (controlplane.Traffic, error) {
	if f.output != "text" && f.output != "json" {
		return controlplane.Traffic{}, fmt.Errorf("--output %q: use text or json", f.output)
	}
	if f.window <= 0 || f.window > controlplane.MaxTrafficWindow {
		return controlplane.Traffic{}, fmt.Errorf("--window %s: give a duration up to %s", f.window, controlplane.MaxTrafficWindow)
	}
	client, err := controlplane.Dial(f.mesh.dir(cmd), f.adminAddr)
	if err != nil {
		return controlplane.Traffic{}, err
	}
	return client.Traffic(cmd.Context(), f.window)
}

// inNamespace reports whether ref (namespace/name) is in ns ("" for all).
func inNamespace(ns, ref string) bool {
	return ns == "" || strings.HasPrefix(ref, ns+"/")
}

func newStatCommand() *cobra.Command {
	var f trafficFlags
	cmd := &cobra.Command{
		Use:   "stat [NAMESPACE/NAME]",
		Short: "Golden metrics per workload: success rate, requests/s, latency, TCP connections",
		Long: `Show, for each workload, whether it is meshed and what its proxies answered
over the window: requests per second, the share without a server error
(success rate), requests authorization denied, latency percentiles measured
at the workload's proxy, and TCP connections. The control plane scrapes its
proxies' metrics; no Prometheus is needed.`,
		Example: `  trellis stat -f examples/zero-trust/mesh.yaml
  trellis stat -f examples/zero-trust/mesh.yaml shipping/orders-api --window 5m -o json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			t, err := f.fetch(cmd)
			if err != nil {
				return err
			}
			var rows []controlplane.WorkloadTraffic
			for _, w := range t.Workloads {
				if inNamespace(f.namespace, w.Workload) && (len(args) == 0 || w.Workload == args[0]) {
					rows = append(rows, w)
				}
			}
			if len(args) == 1 && len(rows) == 0 {
				return fmt.Errorf("no workload %s in the mesh", args[0])
			}
			if f.output == "json" {
				return writeJSONTo(cmd.OutOrStdout(), rows)
			}
			printStat(cmd.OutOrStdout(), rows, t)
			return nil
		},
	}
	f.add(cmd)
	return cmd
}

func newEdgesCommand() *cobra.Command {
	var f trafficFlags
	cmd := &cobra.Command{
		Use:   "edges",
		Short: "Every observed caller → callee pair, and whether it is mutual TLS",
		Long: `Show every caller → callee pair seen over the window with the identities of
both ends, whether the edge is mutual TLS, its request and connection rates
and success rate. A plaintext edge says why: a caller without sidecar
(which STRICT would cut off), or a destination outside the mesh.`,
		Example: `  trellis edges -f examples/permissive-to-strict/mesh.yaml
  trellis edges -f examples/zero-trust/mesh.yaml --namespace shipping -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, err := f.fetch(cmd)
			if err != nil {
				return err
			}
			var rows []controlplane.EdgeTraffic
			for _, e := range t.Edges {
				if f.namespace == "" || inNamespace(f.namespace, e.Source) || inNamespace(f.namespace, e.Destination) {
					rows = append(rows, e)
				}
			}
			if f.output == "json" {
				return writeJSONTo(cmd.OutOrStdout(), rows)
			}
			printEdges(cmd.OutOrStdout(), rows, t)
			return nil
		},
	}
	f.add(cmd)
	return cmd
}

func writeJSONTo(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStat(out io.Writer, rows []controlplane.WorkloadTraffic, t controlplane.Traffic) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tMESHED\tPROXIES\tSUCCESS\tRPS\tDENIED/S\tP50\tP95\tP99\tTCP/S\tTCP OPEN")
	for _, w := range rows {
		meshed := "yes"
		if !w.Meshed {
			meshed = "no"
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\n", w.Workload, meshed)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f\n", w.Workload, meshed, w.Proxies,
			percent(w.SuccessRate), rate(w.RequestsPerSecond), rate(w.DeniedPerSecond),
			millis(w.Latency, func(l *telemetry.Latency) float64 { return l.P50 }),
			millis(w.Latency, func(l *telemetry.Latency) float64 { return l.P95 }),
			millis(w.Latency, func(l *telemetry.Latency) float64 { return l.P99 }),
			rate(w.TCPConnectionsPerSecond), w.TCPOpenConnections)
	}
	tw.Flush()
	fmt.Fprintf(out, "\nOver the last %s, as each workload's proxy answered (inbound).\n", t.Window)
	printScrapeErrors(out, t)
}

func printEdges(out io.Writer, rows []controlplane.EdgeTraffic, t controlplane.Traffic) {
	if len(rows) == 0 {
		fmt.Fprintf(out, "No traffic in the last %s.\n", t.Window)
		printScrapeErrors(out, t)
		return
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SOURCE\tDESTINATION\tMTLS\tSUCCESS\tRPS\tDENIED/S\tTCP/S\tTCP OPEN\tREFUSED/S\tSOURCE IDENTITY")
	plaintext := 0
	for _, e := range rows {
		mtls := "yes"
		if !e.MTLS {
			mtls = "NO"
			plaintext++
		}
		id := e.SourceIdentity
		if id == "" {
			id = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f\t%s\t%s\n", e.Source, e.Destination, mtls, percent(e.SuccessRate),
			rate(e.RequestsPerSecond), rate(e.DeniedPerSecond), rate(e.TCPConnectionsPerSecond), e.TCPOpenConnections, rate(e.RefusedPerSecond), id)
	}
	tw.Flush()
	if plaintext > 0 {
		fmt.Fprintf(out, "\nPlaintext edges:\n")
		for _, e := range rows {
			if !e.MTLS {
				fmt.Fprintf(out, "  %s → %s: %s\n", e.Source, e.Destination, e.Plaintext)
			}
		}
	}
	fmt.Fprintf(out, "\nOver the last %s.\n", t.Window)
	printScrapeErrors(out, t)
}

func printScrapeErrors(out io.Writer, t controlplane.Traffic) {
	for _, instance := range slices.Sorted(maps.Keys(t.ScrapeErrors)) {
		fmt.Fprintf(out, "WARNING: the metrics of %s could not be read (%s); its figures are missing.\n", instance, t.ScrapeErrors[instance])
	}
}

func percent(p *float64) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f%%", *p*100)
}

func rate(r float64) string {
	if r == 0 {
		return "0"
	}
	return fmt.Sprintf("%.2f", r)
}

func millis(l *telemetry.Latency, pick func(*telemetry.Latency) float64) string {
	if l == nil {
		return "-"
	}
	return fmt.Sprintf("%.1fms", pick(l))
}

func newCheckCommand() *cobra.Command {
	var (
		mesh              meshFlags
		adminAddr, output string
		window            time.Duration
		kubernetes        bool
		kubeconfig        string
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check the mesh's health: control plane, proxies, certificates, plaintext traffic",
		Long: `Check the health of a running mesh: the control plane is reachable and its
configuration accepted; every proxy connected and running its current
configuration; the roots and intermediate valid (a warning 30 days ahead of
expiry); every workload certificate valid and renewed in time; and no caller
still reaching a meshed workload in plaintext (which STRICT would refuse).
With --kubernetes, the cluster too: the CRDs installed, the control plane's
Deployment available, the injector's webhook configured, every injected pod's
proxy ready, no pod of a meshed namespace left without the sidecar, and the
roots of the published trust bundle not about to expire.
Exits with status 1 if a check fails; warnings do not fail.`,
		Example: `  trellis check -f examples/zero-trust/mesh.yaml
  trellis check --state-dir /var/lib/trellis -o json
  trellis check --kubernetes --kubeconfig ~/.kube/config`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: use text or json", output)
			}
			if window <= 0 || window > controlplane.MaxTrafficWindow {
				return fmt.Errorf("--window %s: give a duration up to %s", window, controlplane.MaxTrafficWindow)
			}
			var findings []meshcheck.Finding
			if kubernetes {
				cf, err := clusterFindings(cmd, kubeconfig)
				if err != nil {
					return err
				}
				findings = append(findings, cf...)
			}
			// In a cluster, the control plane's own view (proxies'
			// versions, certificates) needs its state: --state-dir or -f.
			askControlPlane := !kubernetes || cmd.Flags().Changed("state-dir") || cmd.Flags().Changed("file") || cmd.Flags().Changed("admin-addr")
			client, err := controlplane.Dial(mesh.dir(cmd), adminAddr)
			var st controlplane.Status
			if err == nil && askControlPlane {
				st, err = client.Status(cmd.Context())
			}
			switch {
			case !askControlPlane:
			case err != nil:
				findings = append(findings, meshcheck.Finding{Check: "control plane", Level: meshcheck.Fail, Message: err.Error()})
			default:
				findings = append(findings, meshcheck.Finding{Check: "control plane", Level: meshcheck.OK, Message: "reachable, trust domain " + st.TrustDomain})
				var traffic *controlplane.Traffic
				if t, err := client.Traffic(cmd.Context(), window); err == nil {
					traffic = &t
				} else {
					findings = append(findings, meshcheck.Finding{Check: "metrics", Level: meshcheck.Warn, Message: "traffic not available: " + err.Error()})
				}
				findings = append(findings, meshcheck.Evaluate(st, traffic, time.Now())...)
			}
			if output == "json" {
				if err := writeJSONTo(cmd.OutOrStdout(), findings); err != nil {
					return err
				}
			} else {
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				for _, f := range findings {
					mark := map[meshcheck.Level]string{meshcheck.OK: "ok", meshcheck.Warn: "WARN", meshcheck.Fail: "FAIL"}[f.Level]
					fmt.Fprintf(tw, "%s\t%s\t%s\n", mark, f.Check, f.Message)
				}
				tw.Flush()
			}
			if meshcheck.Failed(findings) {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	mesh.add(cmd)
	cmd.Flags().StringVar(&adminAddr, "admin-addr", "", "admin API address (default: read from the state directory)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.Flags().DurationVarP(&window, "window", "w", 5*time.Minute, "how far back to look for plaintext traffic")
	cmd.Flags().BoolVar(&kubernetes, "kubernetes", false, "check Trellis in a Kubernetes cluster too")
	cmd.Flags().StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (default: $KUBECONFIG or ~/.kube/config)")
	return cmd
}

func newDashboardCommand() *cobra.Command {
	var (
		mesh              meshFlags
		adminAddr, listen string
	)
	cmd := &cobra.Command{
		Use:   "dashboard",
		Short: "Serve the web dashboard on this machine's loopback and print its address",
		Long: `Serve the dashboard the control plane embeds — the topology with mTLS and
plaintext edges, golden metrics with charts, policies and their decisions,
identities and certificate expiry, a live tap, updated live — on a loopback
address, and print a link to it. The control plane's admin API needs a
credential and its own TLS trust; this command holds both and forwards only
what the dashboard reads, so the browser needs neither. The link carries a
key of this run's: other local users, and other sites open in the browser,
get nothing. Ctrl-C stops it.`,
		Example: `  trellis dashboard -f examples/zero-trust/mesh.yaml
  trellis dashboard --state-dir /var/lib/trellis --listen 127.0.0.1:50750`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			host, _, err := net.SplitHostPort(listen)
			if ip := net.ParseIP(host); err != nil || host != "localhost" && (ip == nil || !ip.IsLoopback()) {
				return fmt.Errorf("--listen %q: give a loopback address such as 127.0.0.1:50750 (the dashboard shows the mesh to whoever reaches it)", listen)
			}
			client, err := controlplane.Dial(mesh.dir(cmd), adminAddr)
			if err != nil {
				return err
			}
			if _, err := client.Status(cmd.Context()); err != nil {
				return err
			}
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return err
			}
			key := rand.Text() // the printed link's, so that other local users cannot browse the mesh
			srv := &http.Server{Handler: client.Forwarder(key), ReadHeaderTimeout: 5 * time.Second}
			fmt.Fprintf(cmd.OutOrStdout(), "Dashboard: http://%s/?key=%s  (Ctrl-C stops it)\n", l.Addr(), key)
			go func() {
				<-cmd.Context().Done()
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				_ = srv.Shutdown(ctx)
				srv.Close() // event streams do not end on their own
			}()
			if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	mesh.add(cmd)
	cmd.Flags().StringVar(&adminAddr, "admin-addr", "", "admin API address (default: read from the state directory)")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:50750", "loopback address to serve the dashboard on")
	return cmd
}

func newTapCommand() *cobra.Command {
	var (
		mesh              meshFlags
		adminAddr, output string
		method, path      string
		max, rate         int
	)
	cmd := &cobra.Command{
		Use:   "tap NAMESPACE/NAME",
		Short: "Watch live the requests through a workload's proxies",
		Long: `Stream the requests the proxies of a workload handle, in and out, as they
happen: source and destination identity, method, path (without its query
string), status, latency, whether the hop is mutual TLS, and authorization's
decision with the policy. Never headers' values or bodies. Each proxy sends
at most --rate events a second; the tap ends after --max events or Ctrl-C.`,
		Example: `  trellis tap -f examples/zero-trust/mesh.yaml shipping/orders-api
  trellis tap -f examples/zero-trust/mesh.yaml shipping/orders-api --method POST --path /v1/ --max 10 -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: use text or json", output)
			}
			if max < 0 || rate < 0 {
				return errors.New("--max and --rate are counts: 0 or more")
			}
			client, err := controlplane.Dial(mesh.dir(cmd), adminAddr)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			enc := json.NewEncoder(out)
			req := controlplane.TapRequest{Workload: args[0], Method: method, PathPrefix: path, Max: max, MaxPerSecond: rate}
			started := func(n int) {
				fmt.Fprintf(cmd.ErrOrStderr(), "Tapping %d proxies of %s (Ctrl-C stops).\n", n, args[0])
			}
			return client.Tap(cmd.Context(), req, started, func(ev controlplane.TapEvent) bool {
				if output == "json" {
					_ = enc.Encode(ev)
					return true
				}
				secured := "mtls"
				if !ev.MTLS {
					secured = "plaintext"
				}
				decision := ""
				if ev.Decision != "" {
					decision = " " + ev.Decision
					if ev.Policy != "" {
						decision += " by " + ev.Policy
					}
				}
				fmt.Fprintf(out, "%s %-8s %s → %s %s %s %d %.1fms %s%s\n", ev.Time.Format("15:04:05.000"), ev.Direction,
					ev.Source, ev.Destination, ev.Method, ev.Path, ev.Status, ev.LatencyMs, secured, decision)
				return true
			})
		},
	}
	mesh.add(cmd)
	cmd.Flags().StringVar(&adminAddr, "admin-addr", "", "admin API address (default: read from the state directory)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json (one event per line)")
	cmd.Flags().StringVar(&method, "method", "", "only requests with this method")
	cmd.Flags().StringVar(&path, "path", "", "only requests whose path starts with this")
	cmd.Flags().IntVar(&max, "max", 0, "stop after this many events (0: until Ctrl-C)")
	cmd.Flags().IntVar(&rate, "rate", 0, "at most this many events a second from each proxy (default 100, at most 1000)")
	return cmd
}

func newAuthzCommand() *cobra.Command {
	var f trafficFlags
	cmd := &cobra.Command{
		Use:   "authz NAMESPACE/NAME",
		Short: "How many requests each policy rule allowed and denied, dry-run policies included",
		Long: `Show, for a workload, how many requests and TCP connections each
authorization policy rule allowed and denied over the window, as its proxies
counted them; dry-run policies' rows count what they would have decided
(nothing they enforce). A row without policy counts the decisions no policy
made: allowed with no ALLOW policy in force, or denied because none matched.`,
		Example: `  trellis authz -f examples/zero-trust/mesh.yaml shipping/orders-api
  trellis authz -f examples/zero-trust/mesh.yaml shipping/orders-api --window 10m -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.namespace != "" {
				return errors.New("--namespace: authz takes one workload, NAMESPACE/NAME")
			}
			t, err := f.fetch(cmd)
			if err != nil {
				return err
			}
			for _, w := range t.Workloads {
				if w.Workload != args[0] {
					continue
				}
				if !w.Meshed {
					return fmt.Errorf("%s has no sidecar: nothing authorizes its requests", args[0])
				}
				if f.output == "json" {
					return writeJSONTo(cmd.OutOrStdout(), w.Rules)
				}
				out := cmd.OutOrStdout()
				if len(w.Rules) == 0 {
					fmt.Fprintf(out, "No decisions in the last %s.\n", t.Window)
					return nil
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "POLICY\tRULE\tMODE\tALLOWED\tDENIED")
				for _, r := range w.Rules {
					policy, rule, mode := r.Policy, r.Rule, "enforced"
					if policy == "" {
						policy, rule = "(no policy decided)", "-"
					}
					if rule == "" {
						rule = "-"
					}
					if r.DryRun {
						mode = "dry-run (would be)"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%.0f\n", policy, rule, mode, r.Allowed, r.Denied)
				}
				tw.Flush()
				fmt.Fprintf(out, "\nRequests and TCP connections over the last %s; rules are numbered from 0 as written.\n", t.Window)
				printScrapeErrors(out, t)
				return nil
			}
			return fmt.Errorf("no workload %s in the mesh", args[0])
		},
	}
	f.add(cmd)
	cmd.Flags().Lookup("namespace").Hidden = true
	return cmd
}
