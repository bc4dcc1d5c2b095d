// Package cli builds the trellis command tree. Each command group lives in its
// own file and is wired into the root here, so the binary's main stays trivial
// and commands can be executed in tests with their own stdout and stderr.
package cli

import (
	"io"
	"log/slog"

	"github.com/spf13/cobra"
)

// NewRoot returns the root trellis command writing to stdout and stderr.
func NewRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "trellis",
		Short: "Trellis: a zero-trust service mesh",
		Long: `Trellis gives every workload a SPIFFE identity, makes every connection
between workloads mutual TLS, and decides who may call whom by identity.`,
		Example: `  trellis ca init && trellis identity issue -n shipping --service-account orders-api --out ./orders
  trellis <command> --help`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(
		newCACommand(),
		newIdentityCommand(),
		newTokenCommand(),
		newPolicyCommand(),
		newControlPlaneCommand(),
		newStatusCommand(),
		newStatCommand(),
		newEdgesCommand(),
		newCheckCommand(),
		newDashboardCommand(),
		newTapCommand(),
		newAuthzCommand(),
		newUpCommand(),
		newDownCommand(),
		newExecCommand(),
		newLogsCommand(),
		newInjectCommand(),
		newInstallCommand(),
	)
	return root
}

// logger returns the slog logger commands use for progress messages; it
// writes to the command's stderr so stdout stays machine-readable.
func logger(cmd *cobra.Command) *slog.Logger {
	return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}
