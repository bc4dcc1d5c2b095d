package cli

import (
	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/version"
)

// newInstallCommand is 'trellis install': the manifests of a cluster
// install, for kubectl apply.
func newInstallCommand() *cobra.Command {
	var o install.Options
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Print the Kubernetes manifests that install Trellis in a cluster",
		Long: `Prints, for kubectl apply, everything Trellis needs in a cluster: the namespace
` + install.Namespace + `, the CustomResourceDefinitions (security.trellis.dev and
networking.trellis.dev), the control plane's service account with the least
privilege it needs, its configuration, Deployment and Service, and the sidecar
injector's webhook configuration (pods of namespaces labelled
trellis.dev/inject=enabled, and pods annotated trellis.dev/inject: enabled).

The control plane keeps its CA in the Secret ` + install.Namespace + `/` + install.CASecret + `, created on
first start. One control plane runs at a time.`,
		Example: `  trellis install | kubectl apply -f -
  kubectl label namespace shipping trellis.dev/inject=enabled
  trellis install --image registry.example/trellis:v0.1.0 --proxy-image registry.example/trellis-proxy:v0.1.0`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := install.Render(o)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	cmd.Flags().StringVar(&o.Image, "image", version.ControlPlaneImage(), "the trellis (control plane) image")
	cmd.Flags().StringVar(&o.ProxyImage, "proxy-image", version.ProxyImage(), "the trellis-proxy image injected into pods")
	cmd.Flags().StringVar(&o.TrustDomain, "trust-domain", "", "the mesh's trust domain (default: cluster.local)")
	return cmd
}
