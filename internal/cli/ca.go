package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// defaultStateDir is where CA state, tokens and registrations live unless
// --state-dir says otherwise.
const defaultStateDir = ".trellis"

func addStateDirFlag(cmd *cobra.Command, dir *string) {
	cmd.Flags().StringVar(dir, "state-dir", defaultStateDir, "directory holding the CA and token state")
}

func loadCA(cmd *cobra.Command, dir string) (*ca.CA, error) {
	return ca.Load(ca.Config{StateDir: dir, Log: logger(cmd)})
}

func newCACommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Manage the certificate authority that issues workload identities",
		Example: `  trellis ca init
  trellis ca inspect
  trellis ca rotate-root prepare`,
	}
	cmd.AddCommand(newCAInitCommand(), newCAInspectCommand(), newCARotateRootCommand())
	return cmd
}

func newCAInitCommand() *cobra.Command {
	var (
		stateDir, trustDomain                  string
		rootCert, rootKey, interCert, interKey string
		rootTTL, intermediateTTL               time.Duration
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the certificate authority (a new root, or one you supply)",
		Long: `Create the certificate authority in the state directory.

Without flags a root (ECDSA P-256, 10 years) and an issuing intermediate
(1 year, renewed automatically at 2/3 of its lifetime) are generated.
You can supply your own root certificate and key, or — keeping the root key
offline, as with Linkerd's trust anchor — a root certificate plus an
intermediate certificate and key signed by it.`,
		Example: `  # A new CA for the default trust domain cluster.local
  trellis ca init

  # Your own root, Trellis generates the intermediate
  trellis ca init --trust-domain example.org --root-cert root.pem --root-key root.key

  # Root key kept offline: supply the intermediate
  trellis ca init --root-cert root.pem --intermediate-cert issuer.pem --intermediate-key issuer.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts := ca.InitOptions{TrustDomain: trustDomain, RootTTL: rootTTL}
			var err error
			for _, f := range []struct {
				path string
				dst  *[]byte
			}{{rootCert, &opts.RootCertPEM}, {rootKey, &opts.RootKeyPEM}, {interCert, &opts.IntermediateCertPEM}, {interKey, &opts.IntermediateKeyPEM}} {
				if f.path == "" {
					continue
				}
				if *f.dst, err = os.ReadFile(f.path); err != nil {
					return fmt.Errorf("read %s: %w", f.path, err)
				}
			}
			authority, err := ca.Init(ca.Config{StateDir: stateDir, Log: logger(cmd), IntermediateTTL: intermediateTTL}, opts)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "Certificate authority for trust domain %s created in %s\n", authority.TrustDomain().Name(), stateDir)
			fmt.Fprintf(out, "Trust bundle: %s\n", ca.BundlePath(stateDir))
			fmt.Fprintf(out, "Next: trellis identity issue --state-dir %s --namespace default --service-account default --out ./id\n", stateDir)
			return nil
		},
	}
	addStateDirFlag(cmd, &stateDir)
	cmd.Flags().StringVar(&trustDomain, "trust-domain", meshid.DefaultTrustDomain, "SPIFFE trust domain of the mesh")
	cmd.Flags().StringVar(&rootCert, "root-cert", "", "PEM file with your root CA certificate")
	cmd.Flags().StringVar(&rootKey, "root-key", "", "PEM file with your root CA private key")
	cmd.Flags().StringVar(&interCert, "intermediate-cert", "", "PEM file with an intermediate CA certificate signed by --root-cert")
	cmd.Flags().StringVar(&interKey, "intermediate-key", "", "PEM file with the intermediate's private key")
	cmd.Flags().DurationVar(&rootTTL, "root-ttl", ca.DefaultRootTTL, "lifetime of a generated root")
	cmd.Flags().DurationVar(&intermediateTTL, "intermediate-ttl", ca.DefaultIntermediateTTL, "lifetime of generated intermediates")
	return cmd
}

func newCAInspectCommand() *cobra.Command {
	var stateDir, output string
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Show the roots and intermediate, their expiry, and warnings",
		Example: `  trellis ca inspect
  trellis ca inspect -o json | jq .warnings`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			st := authority.Status()
			switch output {
			case "json":
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			case "text":
				printCAStatus(cmd.OutOrStdout(), st, time.Now())
				return nil
			default:
				return fmt.Errorf("unknown output format %q: use text or json", output)
			}
		},
	}
	addStateDirFlag(cmd, &stateDir)
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func printCAStatus(w io.Writer, st ca.Status, now time.Time) {
	fmt.Fprintf(w, "Trust domain: %s\n\n", st.TrustDomain)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROLE\tSTATE\tSHA-256\tNOT AFTER\tEXPIRES IN\tKEY HELD")
	row := func(c ca.CertStatus) {
		state := c.State
		if state == "" {
			state = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s…\t%s\t%s\t%v\n", c.Role, state, c.Fingerprint[:16], c.NotAfter.Format(time.RFC3339), humanDuration(c.NotAfter.Sub(now)), c.KeyHeld)
	}
	for _, r := range st.Roots {
		row(r)
	}
	row(st.Intermediate)
	tw.Flush()
	if st.IntermediateRenewsAt != nil {
		fmt.Fprintf(w, "\nThe intermediate renews itself at %s.\n", st.IntermediateRenewsAt.UTC().Format(time.RFC3339))
	}
	if len(st.Warnings) == 0 {
		fmt.Fprintln(w, "\nNo warnings.")
		return
	}
	fmt.Fprintln(w)
	for _, warn := range st.Warnings {
		fmt.Fprintf(w, "WARNING: %s\n", warn)
	}
}

func humanDuration(d time.Duration) string {
	if d < 0 {
		return "expired"
	}
	days := int(d.Hours() / 24)
	switch {
	case days >= 2:
		return fmt.Sprintf("%dd", days)
	case d >= time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return d.Round(time.Second).String()
	}
}

func newCARotateRootCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rotate-root",
		Short: "Replace the root CA in three steps: prepare, activate, retire",
		Long: `Replace the root CA without breaking any connection. Run the steps in order,
waiting in between:

  prepare   adds a new root to the trust bundle; issuance is unchanged.
            Wait until every workload has the new bundle (it comes with each
            certificate renewal, i.e. within one workload certificate lifetime).
  activate  issues from a new intermediate under the new root. Certificates
            issued before keep verifying because the old root is still trusted.
  retire    removes the old root once no certificate issued under it can still
            be valid (it refuses earlier unless --force).`,
		Example: `  trellis ca rotate-root prepare
  trellis ca rotate-root activate
  trellis ca rotate-root retire`,
	}
	var stateDir, rootCert, rootKey string
	var rootTTL time.Duration
	var force bool
	prepare := &cobra.Command{
		Use:     "prepare",
		Short:   "Add a new root (generated, or --root-cert/--root-key) to the trust bundle",
		Example: "  trellis ca rotate-root prepare --state-dir .trellis",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			var certPEM, keyPEM []byte
			if rootCert != "" || rootKey != "" {
				if rootCert == "" || rootKey == "" {
					return fmt.Errorf("--root-cert and --root-key go together")
				}
				if certPEM, err = os.ReadFile(rootCert); err != nil {
					return err
				}
				if keyPEM, err = os.ReadFile(rootKey); err != nil {
					return err
				}
			}
			if err := authority.PrepareRoot(certPEM, keyPEM, rootTTL); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "New root added to the trust bundle (%d roots trusted).\nWhen every workload has renewed its certificate, run: trellis ca rotate-root activate\n", len(authority.Bundle()))
			return nil
		},
	}
	prepare.Flags().StringVar(&rootCert, "root-cert", "", "PEM file with the new root certificate (default: generate one)")
	prepare.Flags().StringVar(&rootKey, "root-key", "", "PEM file with the new root's private key")
	prepare.Flags().DurationVar(&rootTTL, "root-ttl", ca.DefaultRootTTL, "lifetime of a generated root")
	activate := &cobra.Command{
		Use:     "activate",
		Short:   "Issue from the new root; the old root stays trusted",
		Example: "  trellis ca rotate-root activate --state-dir .trellis",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			if err := authority.ActivateRoot(force); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "Issuing from the new root. When every workload has renewed, run: trellis ca rotate-root retire")
			return nil
		},
	}
	retire := &cobra.Command{
		Use:     "retire",
		Short:   "Remove the old root from the trust bundle",
		Example: "  trellis ca rotate-root retire --state-dir .trellis",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			if err := authority.RetireRoot(force); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "Old root removed from the trust bundle. Root rotation complete.")
			return nil
		},
	}
	activate.Flags().BoolVar(&force, "force", false, "activate even though some workloads may not have the new root in their bundle yet")
	retire.Flags().BoolVar(&force, "force", false, "retire even though certificates issued under the old root may still be valid")
	for _, c := range []*cobra.Command{prepare, activate, retire} {
		addStateDirFlag(c, &stateDir)
		cmd.AddCommand(c)
	}
	return cmd
}
