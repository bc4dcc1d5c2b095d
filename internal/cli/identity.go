package cli

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/certpem"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	identityv1 "github.com/trellis-mesh/trellis/api/identity/v1"
	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/jointoken"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// DefaultIdentityAddr is where the identity service listens by default.
const DefaultIdentityAddr = "127.0.0.1:15012"

func newIdentityCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "identity",
		Short: "Issue and request workload identities (X.509-SVIDs)",
		Example: `  trellis identity issue -n shipping --service-account orders-api --out ./orders
  trellis identity serve
  trellis identity request -n shipping --service-account orders-api --token-file token --out ./orders`,
	}
	cmd.AddCommand(newIdentityIssueCommand(), newIdentityServeCommand(), newIdentityRequestCommand())
	return cmd
}

func newIdentityIssueCommand() *cobra.Command {
	var (
		stateDir, namespace, serviceAccount, out string
		ttl                                      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "issue",
		Short: "Issue a key, SVID and trust bundle to files, straight from the local CA",
		Long: `Issue a workload identity to files: key.pem (0600), cert.pem (the SVID and
its intermediate) and bundle.pem (the trust bundle). It signs with the CA in
the state directory directly; use it to try the mesh's identities with curl
or openssl, and in tests. Workloads in the mesh get theirs from the identity
service instead, with a key that never leaves them.`,
		Example: `  trellis identity issue --namespace shipping --service-account orders-api --out ./orders
  openssl verify -CAfile orders/bundle.pem -untrusted orders/cert.pem orders/cert.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out is required: the directory to write key.pem, cert.pem and bundle.pem to")
			}
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			id, err := meshid.Workload(authority.TrustDomain(), namespace, serviceAccount)
			if err != nil {
				return err
			}
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				return err
			}
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
			if err != nil {
				return err
			}
			chain, err := authority.Sign(csr, id, ttl)
			if err != nil {
				return err
			}
			svid, err := identity.NewSVID(chain, key, authority.Bundle(), time.Now())
			if err != nil {
				return err
			}
			if err := svid.WriteFiles(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Issued %s (valid until %s) to %s/{%s,%s,%s}\n",
				id, chain[0].NotAfter.UTC().Format(time.RFC3339), out, identity.KeyFile, identity.CertFile, identity.BundleFile)
			return nil
		},
	}
	addStateDirFlag(cmd, &stateDir)
	addIdentityFlags(cmd, &namespace, &serviceAccount, &ttl)
	cmd.Flags().StringVar(&out, "out", "", "directory to write key.pem, cert.pem and bundle.pem to")
	return cmd
}

func addIdentityFlags(cmd *cobra.Command, namespace, serviceAccount *string, ttl *time.Duration) {
	cmd.Flags().StringVarP(namespace, "namespace", "n", "default", "namespace of the workload")
	cmd.Flags().StringVar(serviceAccount, "service-account", "default", "service account of the workload")
	cmd.Flags().DurationVar(ttl, "ttl", 0, fmt.Sprintf("certificate lifetime, at least %v (default %v)", ca.MinWorkloadTTL, ca.DefaultWorkloadTTL))
}

func newIdentityServeCommand() *cobra.Command {
	var (
		stateDir, listen   string
		checkEvery, maxTTL time.Duration
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the identity service: workloads trade a join token or their current SVID for a certificate",
		Long: `Run the identity service (gRPC over TLS with the control plane's own SVID).
Workloads authenticate with a join token ('trellis token create') the first
time and with their current certificate afterwards. The CA's intermediate is
renewed while it runs, and root rotation steps run from the CLI are picked up.`,
		Example: `  trellis identity serve --listen 127.0.0.1:15012`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := logger(cmd)
			if checkEvery <= 0 {
				return fmt.Errorf("--check-interval must be positive, such as 10s")
			}
			if maxTTL < ca.MinWorkloadTTL {
				return fmt.Errorf("--max-ttl must be at least %v", ca.MinWorkloadTTL)
			}
			authority, err := loadCA(cmd, stateDir)
			if err != nil {
				return err
			}
			svc := identityservice.New(identityservice.Config{
				CA:     authority,
				Log:    log,
				MaxTTL: maxTTL,
				Authenticators: []identityservice.Authenticator{
					identityservice.JoinTokens{Store: jointoken.NewStore(stateDir, nil), TrustDomain: authority.TrustDomain()},
				},
			})
			lis, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("listen on %s: %w (is another control plane running? choose another --listen)", listen, err)
			}
			g := grpc.NewServer(grpc.Creds(svc.ServerCredentials()))
			svc.Register(g)
			fmt.Fprintf(cmd.OutOrStdout(), "Identity service for %s listening on %s (SPIFFE ID %s)\n",
				authority.TrustDomain().Name(), lis.Addr(), meshid.ControlPlane(authority.TrustDomain()))

			ctx := cmd.Context()
			eg, ctx := errgroup.WithContext(ctx)
			eg.Go(func() error { return authority.Run(ctx, checkEvery) })
			eg.Go(func() error { return g.Serve(lis) })
			eg.Go(func() error {
				<-ctx.Done()
				g.GracefulStop()
				return nil
			})
			return eg.Wait()
		},
	}
	addStateDirFlag(cmd, &stateDir)
	cmd.Flags().StringVar(&listen, "listen", DefaultIdentityAddr, "address to serve the identity API on")
	cmd.Flags().DurationVar(&checkEvery, "check-interval", 10*time.Second, "how often to check the CA state for changes and the intermediate for renewal")
	cmd.Flags().DurationVar(&maxTTL, "max-ttl", ca.DefaultWorkloadTTL, "longest certificate lifetime a workload may ask for")
	return cmd
}

func newIdentityRequestCommand() *cobra.Command {
	var (
		server, bundleFile, token, tokenFile, namespace, serviceAccount, out, trustDomain string
		ttl                                                                               time.Duration
	)
	cmd := &cobra.Command{
		Use:   "request",
		Short: "Obtain an identity from the identity service with a join token, as a workload does",
		Long: `Generate a key locally, send a CSR with a join token to the identity service,
and write key.pem, cert.pem and bundle.pem. The key never leaves this machine.`,
		Example: `  TOKEN=$(trellis token create --namespace shipping --service-account orders-api)
  trellis identity request --server 127.0.0.1:15012 --ca-bundle .trellis/bundle.pem \
    --namespace shipping --service-account orders-api --token "$TOKEN" --out ./orders`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out is required: the directory to write key.pem, cert.pem and bundle.pem to")
			}
			if tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return err
				}
				token = strings.TrimSpace(string(b))
			}
			if token == "" {
				return errors.New("a join token is required: pass --token or --token-file (create one with 'trellis token create')")
			}
			pem, err := os.ReadFile(bundleFile)
			if err != nil {
				return fmt.Errorf("read the trust bundle: %w (it is bundle.pem in the control plane's state directory)", err)
			}
			bundle, err := certpem.ParseCerts(pem)
			if err != nil {
				return fmt.Errorf("%s: %w", bundleFile, err)
			}
			td, err := spiffeid.TrustDomainFromString(trustDomain)
			if err != nil {
				return fmt.Errorf("--trust-domain %q: %w", trustDomain, err)
			}
			id, err := meshid.Workload(td, namespace, serviceAccount)
			if err != nil {
				return err
			}
			src, err := identity.NewSource(identity.Config{
				Log: logger(cmd), Addr: server, ID: id, ServerID: meshid.ControlPlane(td), Bundle: bundle, TTL: ttl,
				Credential: &identityv1.Credential{Type: identityservice.JoinTokenType, Value: token},
			})
			if err != nil {
				return err
			}
			if err := src.Fetch(cmd.Context()); err != nil {
				return err
			}
			if err := src.Current().WriteFiles(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Obtained %s (valid until %s) into %s\n", id, src.Current().NotAfter().UTC().Format(time.RFC3339), out)
			return nil
		},
	}
	cmd.Flags().StringVar(&server, "server", DefaultIdentityAddr, "address of the identity service")
	cmd.Flags().StringVar(&bundleFile, "ca-bundle", defaultStateDir+"/bundle.pem", "PEM trust bundle to verify the identity service with")
	cmd.Flags().StringVar(&token, "token", "", "join token (visible in the process list; prefer --token-file)")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "file holding the join token")
	cmd.Flags().StringVar(&out, "out", "", "directory to write key.pem, cert.pem and bundle.pem to")
	cmd.Flags().StringVar(&trustDomain, "trust-domain", meshid.DefaultTrustDomain, "trust domain of the mesh")
	addIdentityFlags(cmd, &namespace, &serviceAccount, &ttl)
	return cmd
}
