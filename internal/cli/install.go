package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/version"
)

// newInstallCommand is 'trellis install': the manifests of a cluster
// install, for kubectl apply.
func newInstallCommand() *cobra.Command {
	var o install.Options
	var rootCert, rootKey string
	var ha bool
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
first start, from a root of its own, or from yours: --root-cert/--root-key
(written into the Secret ` + install.RootSecret + `), or --root-secret naming a
kubernetes.io/tls Secret of ` + install.Namespace + ` (one cert-manager keeps).

--ha runs three control planes (or --replicas): the first to start creates the
CA, the others take it from its Secret; every one serves proxies, and a
disruption budget keeps one up through node drains.`,
		Example: `  trellis install | kubectl apply -f -
  kubectl label namespace shipping trellis.dev/inject=enabled
  trellis install --image registry.example/trellis:v0.1.0 --proxy-image registry.example/trellis-proxy:v0.1.0
  trellis install --root-cert root.pem --root-key root.key | kubectl apply -f -
  trellis install --ha | kubectl apply -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, f := range []struct {
				flag, path string
				dst        *[]byte
			}{{"--root-cert", rootCert, &o.RootCertPEM}, {"--root-key", rootKey, &o.RootKeyPEM}} {
				if f.path == "" {
					continue
				}
				data, err := os.ReadFile(f.path)
				if err != nil {
					return fmt.Errorf("%s: %w", f.flag, err)
				}
				*f.dst = data
			}
			if ha && !cmd.Flags().Changed("replicas") {
				o.Replicas = 3
			}
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
	cmd.Flags().BoolVar(&ha, "ha", false, "run three control plane replicas")
	cmd.Flags().Int32Var(&o.Replicas, "replicas", 1, "control plane replicas")
	cmd.Flags().StringVar(&rootCert, "root-cert", "", "PEM root certificate the CA is made from (with --root-key)")
	cmd.Flags().StringVar(&rootKey, "root-key", "", "PEM key of --root-cert")
	cmd.Flags().StringVar(&o.RootSecret, "root-secret", "", "name of a kubernetes.io/tls Secret in "+install.Namespace+" holding the root (such as one cert-manager keeps)")
	return cmd
}
