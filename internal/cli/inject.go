package cli

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/version"
)

// newInjectCommand is 'trellis inject': the admission webhook's injection,
// applied to manifests offline.
func newInjectCommand() *cobra.Command {
	var file string
	cfg := inject.Config{}
	cmd := &cobra.Command{
		Use:   "inject -f FILE",
		Short: "Add the Trellis sidecar to Kubernetes manifests (offline)",
		Long: `Reads Kubernetes manifests and writes them back with the Trellis sidecar in every
pod and pod template (Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
CronJobs, Pods, and Lists of them); other objects pass through. It is what the
admission webhook does to pods of namespaces labelled ` + inject.NamespaceLabel + `=enabled,
for clusters without the webhook or for review before applying.

Pods annotated ` + inject.Annotation + `: disabled, and pods on the host's network, are left
alone. Injecting an injected manifest again gives the same manifest. Comments
are not kept, and keys come out sorted.`,
		Example: `  trellis inject -f deployment.yaml | kubectl apply -f -
  kubectl get deploy orders-api -o yaml | trellis inject -f - | kubectl apply -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return fmt.Errorf("-f is required: a manifest file, or - for standard input")
			}
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(cmd.InOrStdin())
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			out, err := cfg.Manifests(data)
			if err != nil {
				if file != "-" {
					return fmt.Errorf("%s: %w", file, err)
				}
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "manifest file, - for standard input")
	cmd.Flags().StringVar(&cfg.ProxyImage, "proxy-image", version.ProxyImage(), "the trellis-proxy image")
	cmd.Flags().StringVar(&cfg.ControlPlane, "control-plane", "", "host:port of the control plane's proxy API (default: trellis-control-plane.trellis-system.svc:15012)")
	cmd.Flags().StringVar(&cfg.TrustDomain, "trust-domain", "", "the mesh's trust domain (default: cluster.local)")
	return cmd
}
