package cli

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/jointoken"
)

func newTokenCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Manage join tokens that bootstrap workload identities outside Kubernetes",
		Example: `  trellis token create -n shipping --service-account orders-api --ttl 1h
  trellis token list
  trellis token revoke 3f2a9c01b7de`,
	}
	var stateDir string
	var (
		namespace, serviceAccount string
		ttl                       time.Duration
		uses                      int
	)
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a join token bound to one namespace and service account",
		Long: `Create a join token. It entitles whoever presents it to certificates for one
identity, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, and
works for --uses requests within --ttl. Only its hash is stored: the token is
printed once, on stdout.`,
		Example: `  trellis token create --namespace shipping --service-account orders-api --ttl 1h
  trellis token create -n shipping --service-account orders-api --uses 3 > token.txt`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, rec, err := jointoken.NewStore(stateDir, nil).Create(namespace, serviceAccount, ttl, uses)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), tok)
			logger(cmd).Info("join token created", "id", rec.ID, "namespace", namespace, "serviceAccount", serviceAccount, "expiresAt", rec.ExpiresAt, "uses", uses)
			return nil
		},
	}
	create.Flags().StringVarP(&namespace, "namespace", "n", "", "namespace the token is bound to (required)")
	create.Flags().StringVar(&serviceAccount, "service-account", "", "service account the token is bound to (required)")
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, fmt.Sprintf("how long the token stays valid (at most %v)", jointoken.MaxTTL))
	create.Flags().IntVar(&uses, "uses", 1, "how many times the token may be used")
	_ = create.MarkFlagRequired("namespace")
	_ = create.MarkFlagRequired("service-account")

	var output string
	list := &cobra.Command{
		Use:     "list",
		Short:   "List live join tokens (never their secrets)",
		Example: "  trellis token list -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tokens, err := jointoken.NewStore(stateDir, nil).List()
			if err != nil {
				return err
			}
			if output == "json" {
				for i := range tokens {
					tokens[i].SecretSHA256 = ""
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(tokens)
			}
			if output != "text" {
				return fmt.Errorf("unknown output format %q: use text or json", output)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAMESPACE\tSERVICE ACCOUNT\tEXPIRES\tUSES LEFT")
			for _, t := range tokens {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", t.ID, t.Namespace, t.ServiceAccount, t.ExpiresAt.Format(time.RFC3339), t.UsesLeft)
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")

	revoke := &cobra.Command{
		Use:     "revoke ID",
		Short:   "Revoke a join token by its id",
		Example: "  trellis token revoke 3f2a9c01b7de",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := jointoken.NewStore(stateDir, nil).Revoke(args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Token %s revoked.\n", args[0])
			return nil
		},
	}
	for _, c := range []*cobra.Command{create, list, revoke} {
		addStateDirFlag(c, &stateDir)
		cmd.AddCommand(c)
	}
	return cmd
}
