package cli

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/decision"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
)

// newPolicyCommand groups the commands that read security policies:
// explain one decision, or check a directory.
func newPolicyCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Explain and check PeerAuthentication and AuthorizationPolicy files",
		Long: `Trellis decides "may this caller do this?" from PeerAuthentication and
AuthorizationPolicy resources in Istio's shape (apiVersion security.trellis.dev/v1;
security.istio.io/v1 and v1beta1 are accepted). The mesh root namespace is
` + policy.DefaultRootNamespace + `.`,
		Example: `  trellis policy check ./policies
  trellis policy explain --policies ./policies --workload shipping/orders-api \
    --labels app=orders-api --port 8080 \
    --source-principal cluster.local/ns/default/sa/checkout-service --method POST --path /v1/orders`,
	}
	cmd.AddCommand(newPolicyExplainCommand(), newPolicyCheckCommand())
	return cmd
}

type explainOptions struct {
	policies  string
	workload  string
	labels    map[string]string
	port      uint32
	protocol  string
	principal string
	plaintext bool
	sourceIP  string
	method    string
	path      string
	host      string
	headers   []string
	output    string
}

func newPolicyExplainCommand() *cobra.Command {
	var o explainOptions
	cmd := &cobra.Command{
		Use:   "explain --policies DIR --workload NAMESPACE/NAME --port N (--source-principal ID | --plaintext)",
		Short: "Explain whether one request or connection to a workload is allowed, and why",
		Long: `explain evaluates one request (or TCP connection) against the policies in a
directory exactly as a Trellis proxy would: the PeerAuthentication mode of the
port first (a STRICT port refuses a plaintext caller), then DENY, then ALLOW
AuthorizationPolicies. It prints the decision, the policy and rule responsible,
and for a denial the ALLOW rule that came closest and why it did not match.
Dry-run policies (annotation trellis.dev/dry-run: "true") are reported, not enforced.
The exit status is 0 whether the request is allowed or denied: read the first
line, or "decision" in -o json.`,
		Example: `  # Why is checkout's GET to orders-api denied?
  trellis policy explain --policies ./policies --workload shipping/orders-api \
    --labels app=orders-api --port 8080 \
    --source-principal cluster.local/ns/default/sa/checkout-service --method GET --path /v1/orders

  # A plaintext TCP connection, as JSON for scripts
  trellis policy explain --policies ./policies --workload db/postgres --labels app=postgres \
    --port 5432 --protocol tcp --plaintext --source-ip 10.0.3.7 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runPolicyExplain(cmd, &o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.policies, "policies", "", "directory of policy YAML files (required)")
	f.StringVar(&o.workload, "workload", "", "destination workload as NAMESPACE/NAME (required)")
	f.StringToStringVar(&o.labels, "labels", nil, "labels of the workload, k=v,k2=v2, matched by policy selectors")
	f.Uint32Var(&o.port, "port", 0, "destination workload port (required)")
	f.StringVar(&o.protocol, "protocol", "http", "protocol of the port: http or tcp")
	f.StringVar(&o.principal, "source-principal", "", "caller identity, cluster.local/ns/NS/sa/SA or spiffe://cluster.local/ns/NS/sa/SA")
	f.BoolVar(&o.plaintext, "plaintext", false, "the caller presented no client certificate")
	f.StringVar(&o.sourceIP, "source-ip", "", "caller IP address")
	f.StringVar(&o.method, "method", "GET", "HTTP method")
	f.StringVar(&o.path, "path", "/", "HTTP path")
	f.StringVar(&o.host, "host", "", "HTTP host (authority)")
	f.StringArrayVar(&o.headers, "header", nil, "HTTP header as name=value; repeat for more")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runPolicyExplain(cmd *cobra.Command, o *explainOptions) error {
	in, err := o.input(cmd)
	if err != nil {
		return err
	}
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("policy explain: unknown output format %q; use -o text or -o json", o.output)
	}
	if o.policies == "" {
		return errors.New("policy explain: --policies is required; point it at the directory of policy YAML files")
	}
	set, err := loadPolicies(o.policies)
	if err != nil {
		if !errors.Is(err, policy.ErrInvalid) {
			return fmt.Errorf("policy explain: %w", err)
		}
		return fmt.Errorf("policy explain: %w\nrun `trellis policy check %s` for details, fix the files, and try again", err, o.policies)
	}
	log := logger(cmd)
	for _, w := range set.Warnings {
		log.Warn("policy warning", "problem", w.Error())
	}
	mesh, err := decision.Compile(set, policy.DefaultRootNamespace)
	if err != nil {
		return fmt.Errorf("policy explain: %w", err)
	}
	d := mesh.Decide(in)
	out := cmd.OutOrStdout()
	if o.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(d.Report())
	}
	return d.WriteText(out)
}

// input turns the flags into a decision input, rejecting combinations that
// could only mislead.
func (o *explainOptions) input(cmd *cobra.Command) (decision.Input, error) {
	var in decision.Input
	ns, name, ok := strings.Cut(o.workload, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return in, fmt.Errorf("policy explain: --workload must be NAMESPACE/NAME, e.g. --workload shipping/orders-api; got %q", o.workload)
	}
	in.Workload = policy.Workload{Namespace: ns, Name: name, Labels: o.labels}
	if o.port < 1 || o.port > 65535 {
		return in, errors.New("policy explain: --port is required: the workload port the caller connects to, from 1 to 65535")
	}
	in.Port = o.port
	switch o.protocol {
	case "http":
		in.Protocol = decision.HTTP
	case "tcp":
		in.Protocol = decision.TCP
		for _, f := range []string{"method", "path", "host", "header"} {
			if cmd.Flags().Changed(f) {
				return in, fmt.Errorf("policy explain: --%s describes an HTTP request; drop it or use --protocol http", f)
			}
		}
	default:
		return in, fmt.Errorf("policy explain: unknown --protocol %q; use http or tcp", o.protocol)
	}
	switch {
	case o.plaintext && o.principal != "":
		return in, errors.New("policy explain: use either --source-principal (an mTLS caller) or --plaintext (no client certificate), not both")
	case o.plaintext:
	case o.principal == "":
		return in, errors.New("policy explain: say who calls: --source-principal cluster.local/ns/NS/sa/SA for an mTLS caller, or --plaintext")
	default:
		p := strings.TrimPrefix(o.principal, "spiffe://")
		id, err := spiffeid.FromString("spiffe://" + p)
		if err != nil {
			return in, fmt.Errorf("policy explain: invalid --source-principal %q: %w; write it as cluster.local/ns/NAMESPACE/sa/NAME", o.principal, err)
		}
		in.Peer = decision.Peer{Authenticated: true, Principal: strings.TrimPrefix(id.String(), "spiffe://")}
	}
	if o.sourceIP != "" {
		ip, err := netip.ParseAddr(o.sourceIP)
		if err != nil {
			return in, fmt.Errorf("policy explain: invalid --source-ip %q; write an address such as 10.0.3.7", o.sourceIP)
		}
		in.Peer.IP = ip
	}
	if in.Protocol == decision.HTTP {
		in.Request = decision.Request{Method: o.method, Path: o.path, Host: o.host, Headers: http.Header{}}
		if o.method == "" {
			return in, errors.New("policy explain: --method cannot be empty; HTTP requests always have one, e.g. GET")
		}
		if !strings.HasPrefix(o.path, "/") {
			return in, fmt.Errorf("policy explain: --path %q must start with '/'", o.path)
		}
		for _, h := range o.headers {
			k, v, ok := strings.Cut(h, "=")
			if !ok || k == "" {
				return in, fmt.Errorf("policy explain: --header %q must be name=value, e.g. --header x-user=alice", h)
			}
			in.Request.Headers.Add(k, v)
		}
	}
	return in, nil
}

func newPolicyCheckCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "check DIR|FILE",
		Short: "Validate policy files and show what applies to which scope",
		Long: `check loads every *.yaml, *.yml and *.json file in DIR strictly. If any file has
a problem, it lists every problem (file, document, field, what is allowed) and
exits non-zero: Trellis never applies part of a directory. Otherwise it prints
which mTLS mode and which authorization policies apply to which scope.`,
		Example: `  trellis policy check ./policies
  trellis policy check examples/policies`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runPolicyCheck(cmd.OutOrStdout(), args[0])
		},
	}
}

// loadPolicies loads a directory of policy files, or a single file.
func loadPolicies(path string) (*policy.Set, error) {
	info, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%s does not exist; pass the directory that holds your policy YAML files", path)
	case err != nil:
		return nil, err
	case info.IsDir():
		return policy.LoadDir(path)
	}
	return policy.LoadFiles(path)
}

func runPolicyCheck(out io.Writer, dir string) error {
	set, err := loadPolicies(dir)
	var errs policy.Errors
	switch {
	case errors.As(err, &errs):
		for _, e := range errs {
			fmt.Fprintln(out, e.Error())
		}
		return fmt.Errorf("policy check: %d %s in %s; fix %s and run the check again", len(errs), pluralize(len(errs), "problem", "problems"), dir, pluralize(len(errs), "it", "them"))
	case err != nil:
		return fmt.Errorf("policy check: %w", err)
	}
	writeSummary(out, dir, set, policy.DefaultRootNamespace)
	return nil
}

func pluralize(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// writeSummary prints what applies to which scope, widest scope first.
func writeSummary(out io.Writer, dir string, set *policy.Set, root string) {
	fmt.Fprintf(out, "%s: valid: %d %s, %d PeerAuthentication, %d AuthorizationPolicy",
		dir, len(set.Files), pluralize(len(set.Files), "file", "files"), len(set.PeerAuthentications), len(set.AuthorizationPolicies))
	for _, k := range []struct {
		n    int
		kind string
	}{{len(set.ServiceEntries), policy.KindServiceEntry}, {len(set.DestinationRules), policy.KindDestinationRule},
		{len(set.VirtualServices), policy.KindVirtualService}, {len(set.HTTPRoutes), policy.KindHTTPRoute}} {
		if k.n > 0 {
			fmt.Fprintf(out, ", %d %s", k.n, k.kind)
		}
	}
	if n := len(set.Skipped); n > 0 {
		kinds := make([]string, 0, n)
		for _, s := range set.Skipped {
			kinds = append(kinds, s.Kind)
		}
		slices.Sort(kinds)
		fmt.Fprintf(out, " (%d other %s skipped: %s)", n, pluralize(n, "document", "documents"), strings.Join(slices.Compact(kinds), ", "))
	}
	fmt.Fprintln(out)

	fmt.Fprintf(out, "\nmTLS (PeerAuthentication; mesh root namespace %s):\n", root)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	conflicts := mtls.Conflicts(set.PeerAuthentications, root)
	ignored := map[*policy.PeerAuthentication]bool{}
	for _, c := range conflicts {
		if !c.Partly {
			ignored[c.Ignored] = true
		}
	}
	scopeRank := map[mtls.Scope]int{mtls.ScopeMesh: 0, mtls.ScopeNamespace: 1, mtls.ScopeWorkload: 2}
	pas := slices.Clone(set.PeerAuthentications)
	slices.SortStableFunc(pas, func(a, b *policy.PeerAuthentication) int {
		return scopeRank[mtls.ScopeOf(a, root)] - scopeRank[mtls.ScopeOf(b, root)]
	})
	meshSet := false
	for _, pa := range pas {
		if ignored[pa] {
			continue
		}
		var where string
		switch mtls.ScopeOf(pa, root) {
		case mtls.ScopeMesh:
			where = "mesh-wide"
			meshSet = meshSet || pa.Spec.MTLS.Effective() != policy.ModeUnset
		case mtls.ScopeNamespace:
			where = "namespace " + pa.Metadata.Namespace
		default:
			where = fmt.Sprintf("namespace %s, workloads with %s", pa.Metadata.Namespace, labelList(pa.Spec.Selector.MatchLabels))
		}
		mode := string(pa.Spec.MTLS.Effective())
		if mode == string(policy.ModeUnset) {
			mode = "UNSET (inherits)"
		}
		var ports []string
		for _, port := range slices.Sorted(maps.Keys(pa.Spec.PortLevelMTLS)) {
			m := pa.Spec.PortLevelMTLS[port]
			ports = append(ports, fmt.Sprintf("port %d: %s", port, m.Effective()))
		}
		if len(ports) > 0 {
			mode += "; " + strings.Join(ports, ", ")
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", where, mode, pa.Metadata.Ref())
	}
	if !meshSet {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", "mesh-wide", policy.ModePermissive, "(default: no mesh-wide mode is set)")
	}
	tw.Flush()
	for _, c := range conflicts {
		if c.Partly {
			fmt.Fprintf(out, "  conflict: %s and %s select some of the same workloads; the older, %s, applies to those\n", c.Winner.Metadata.Ref(), c.Ignored.Metadata.Ref(), c.Winner.Metadata.Ref())
			continue
		}
		fmt.Fprintf(out, "  ignored: %s; the older %s of the same scope applies (oldest wins)\n", c.Ignored.Metadata.Ref(), c.Winner.Metadata.Ref())
	}

	fmt.Fprintln(out, "\nauthorization (AuthorizationPolicy; DENY first, then ALLOW):")
	if len(set.AuthorizationPolicies) == 0 {
		fmt.Fprintln(out, "  none: every request that passes mTLS is allowed")
	}
	aps := slices.Clone(set.AuthorizationPolicies)
	actionRank := map[policy.Action]int{policy.ActionDeny: 0, policy.ActionAllow: 1, policy.ActionAudit: 2}
	slices.SortStableFunc(aps, func(a, b *policy.AuthorizationPolicy) int {
		return cmp.Or(
			cmp.Compare(boolRank(a.Metadata.Namespace != root), boolRank(b.Metadata.Namespace != root)),
			strings.Compare(a.Metadata.Namespace, b.Metadata.Namespace),
			cmp.Compare(actionRank[a.Spec.EffectiveAction()], actionRank[b.Spec.EffectiveAction()]),
		)
	})
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, ap := range aps {
		where := "all namespaces"
		if ap.Metadata.Namespace != root {
			where = "namespace " + ap.Metadata.Namespace
		}
		if ap.Spec.Selector.Empty() {
			where += ", all workloads"
		} else {
			where += ", workloads with " + labelList(ap.Spec.Selector.MatchLabels)
		}
		action := string(ap.Spec.EffectiveAction())
		if ap.DryRun() {
			action += " (dry-run)"
		}
		var rules string
		switch n := len(ap.Spec.Rules); {
		case n == 0 && ap.Spec.EffectiveAction() == policy.ActionAllow:
			rules = "no rules: denies every request"
		case n == 0:
			rules = "no rules: no effect"
		default:
			rules = fmt.Sprintf("%d %s", n, pluralize(n, "rule", "rules"))
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", where, action, ap.Metadata.Ref(), rules)
	}
	tw.Flush()
	if len(set.Warnings) > 0 {
		fmt.Fprintln(out, "\nwarnings:")
		for _, w := range set.Warnings {
			fmt.Fprintf(out, "  %s\n", w.Error())
		}
	}
}

func boolRank(b bool) int {
	if b {
		return 1
	}
	return 0
}

func labelList(labels map[string]string) string {
	keys := slices.Sorted(maps.Keys(labels))
	kv := make([]string, len(keys))
	for i, k := range keys {
		kv[i] = k + "=" + labels[k]
	}
	return strings.Join(kv, ",")
}
