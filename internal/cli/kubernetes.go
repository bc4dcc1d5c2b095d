package cli

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/k8s/clustercheck"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/tokenreview"
	"github.com/trellis-mesh/trellis/internal/meshcheck"
	"github.com/trellis-mesh/trellis/internal/version"
)

// kubeFlags connect the control plane to a Kubernetes cluster.
type kubeFlags struct {
	enabled       bool
	kubeconfig    string
	proxyImage    string
	proxyAddress  string
	webhookListen string
	webhookURL    string
	caSecret      string
	rootSecret    string
	leaderElect   bool
}

func (k *kubeFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.BoolVar(&k.enabled, "kubernetes", false, "take workloads, services and resources from a Kubernetes cluster")
	f.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (default: the pod's service account, in the cluster)")
	f.StringVar(&k.proxyImage, "proxy-image", version.ProxyImage(), "the trellis-proxy image the injector gives pods")
	f.StringVar(&k.proxyAddress, "proxy-address", "", "host:port injected proxies reach the control plane at (default: its Service, trellis-control-plane.trellis-system.svc:15012)")
	f.StringVar(&k.webhookListen, "webhook-listen", "", "address of the sidecar injector webhook (HTTPS), such as 0.0.0.0:15017; empty: no injector")
	f.StringVar(&k.caSecret, "ca-secret", "", "namespace/name of a Secret keeping the CA, so a control plane whose state directory is emptied (a new pod) restarts with the same CA; empty: the state directory only")
	f.BoolVar(&k.leaderElect, "leader-elect", false, "with several control planes sharing --ca-secret: elect the one that keeps the CA in it (a Lease of that name); the others take the CA from it")
	f.StringVar(&k.rootSecret, "root-secret", "", "namespace/name of a kubernetes.io/tls Secret holding the root certificate and key the CA is made from (such as one cert-manager keeps), read when the CA is first created; empty: a root of its own")
	f.StringVar(&k.webhookURL, "webhook-url", "", "URL the API server calls the injector at, written into its webhook configuration (\"auto\": the --webhook-listen address, for a control plane outside the cluster); empty: the Service")
}

// clusterFindings judges Trellis in the cluster a kubeconfig names.
func clusterFindings(cmd *cobra.Command, kubeconfig string) ([]meshcheck.Finding, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("--kubernetes: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	facts, err := clustercheck.Gather(cmd.Context(), client, dyn)
	if err != nil {
		return []meshcheck.Finding{{Check: "cluster", Level: meshcheck.Fail, Message: err.Error()}}, nil
	}
	return clustercheck.Evaluate(facts, time.Now()), nil
}

// given returns a Kubernetes flag set without --kubernetes, if any.
func (k *kubeFlags) given(cmd *cobra.Command) string {
	for _, f := range []string{"kubeconfig", "proxy-image", "proxy-address", "webhook-listen", "webhook-url", "ca-secret", "root-secret", "leader-elect"} {
		if cmd.Flags().Changed(f) {
			return f
		}
	}
	return ""
}

// connect builds the clients and the control plane's Kubernetes options.
func (k *kubeFlags) connect(trustDomain string) (*controlplane.Kubernetes, error) {
	var rc *rest.Config
	var err error
	if k.kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", k.kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("--kubernetes: %w (give --kubeconfig outside a cluster)", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("--kubernetes: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("--kubernetes: %w", err)
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, err
	}
	for _, f := range []struct{ flag, value string }{{"ca-secret", k.caSecret}, {"root-secret", k.rootSecret}} {
		if ns, name, ok := strings.Cut(f.value, "/"); f.value != "" && (!ok || ns == "" || name == "") {
			return nil, fmt.Errorf("--%s %q: write namespace/name, such as trellis-system/trellis-ca", f.flag, f.value)
		}
	}
	if k.leaderElect && k.caSecret == "" {
		return nil, fmt.Errorf("--leader-elect needs --ca-secret: the leader keeps the CA there for the others")
	}
	if k.webhookURL != "" && k.webhookListen == "" {
		return nil, fmt.Errorf("--webhook-url needs --webhook-listen: the injector must listen somewhere")
	}
	return &controlplane.Kubernetes{
		Client:        client,
		Dynamic:       dyn,
		Authenticator: tokenreview.Authenticator{Client: client.AuthenticationV1().TokenReviews(), TrustDomain: td},
		Inject:        inject.Config{ProxyImage: k.proxyImage, ControlPlane: k.proxyAddress, TrustDomain: trustDomain},
		WebhookListen: k.webhookListen,
		WebhookURL:    k.webhookURL,
		CASecret:      k.caSecret,
		RootSecret:    k.rootSecret,
		LeaderElect:   k.leaderElect,
	}, nil
}
