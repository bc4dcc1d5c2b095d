// Command trellis-proxy is the Trellis sidecar. It runs beside one workload,
// holds the workload's identity (obtained from the identity service with a
// key generated here, or loaded from files with --static) and keeps it
// renewed, serves the workload's inbound and outbound traffic as mutual TLS
// with the listeners and destinations of --config, and serves its admin
// endpoints. The binary stays lean: no Kubernetes client, no CA code (see
// deps_test.go).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/admin"
	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/discovery"
	"github.com/trellis-mesh/trellis/internal/identity"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/proxy"
	proxyconfig "github.com/trellis-mesh/trellis/internal/proxy/config"
	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "trellis-proxy:", err)
		stop()
		os.Exit(1)
	}
}

// config is the proxy's validated configuration.
type config struct {
	configFile     string
	pprof          bool
	adminAddr      string
	statsAddr      string
	static         string
	identityAddr   string
	caBundle       string
	trustDomain    string
	namespace      string
	serviceAccount string
	joinTokenFile  string
	// kubeTokenFile is a projected Kubernetes service account token.
	kubeTokenFile string
	ttl           time.Duration
	// follow makes the proxy follow the control plane at identityAddr:
	// it registers as an instance of the config's workload and takes its
	// policies and destinations from there.
	follow      bool
	instance    string
	advertiseIP string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("trellis-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.configFile, "config", "", "proxy configuration file (kind: ProxyConfig): listeners, destinations, policies")
	fs.StringVar(&c.adminAddr, "admin-addr", "127.0.0.1:15000", "address of the admin endpoints (/live, /ready, /config, /metrics, POST /shutdown)")
	fs.StringVar(&c.statsAddr, "stats-addr", "", "address serving only GET /metrics, /ready and /live, for scrapers outside the workload (the control plane, Prometheus); empty: none")
	fs.BoolVar(&c.pprof, "pprof", false, "serve Go's profiling endpoints under /debug/pprof/ on the admin address")
	fs.StringVar(&c.static, "static", "", "load the identity from key.pem, cert.pem and bundle.pem in this directory (re-read when they change) instead of the identity service")
	fs.StringVar(&c.identityAddr, "identity-addr", "127.0.0.1:15012", "address of the identity service")
	fs.StringVar(&c.caBundle, "ca-bundle", "", "PEM trust bundle to verify the identity service with")
	fs.StringVar(&c.trustDomain, "trust-domain", meshid.DefaultTrustDomain, "trust domain of the mesh")
	fs.StringVar(&c.namespace, "namespace", "", "namespace of the workload")
	fs.StringVar(&c.serviceAccount, "service-account", "", "service account of the workload")
	fs.StringVar(&c.joinTokenFile, "join-token-file", "", "file holding the join token for the first certificate")
	fs.StringVar(&c.kubeTokenFile, "kubernetes-token-file", "", "file holding the pod's projected service account token (audience trellis), read again at each use, for the first certificate (instead of --join-token-file)")
	fs.DurationVar(&c.ttl, "cert-ttl", 0, "workload certificate lifetime to ask for (default: the control plane's)")
	fs.BoolVar(&c.follow, "control-plane", false, "register the --config workload with the control plane at --identity-addr and take policies and destinations from it")
	fs.StringVar(&c.instance, "instance", "", "name of this replica among the workload's (default: the host name)")
	fs.StringVar(&c.advertiseIP, "advertise-ip", "", "IP address mesh peers reach this workload at (needed for transparent inbound and wildcard listeners)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, `Usage: trellis-proxy [flags]
       trellis-proxy intercept [flags]   (install the interception rules and exit)

Examples:
  trellis-proxy --ca-bundle .trellis/bundle.pem --namespace shipping \
    --service-account orders-api --join-token-file token
  trellis-proxy --static ./orders --config proxy.yaml
  trellis-proxy --ca-bundle .trellis/bundle.pem --namespace shipping \
    --service-account orders-api --join-token-file token \
    --config proxy.yaml --control-plane --advertise-ip 198.18.0.10

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q: every setting is a flag (see --help)", fs.Args())
	}
	if c.follow && c.static != "" {
		return c, errors.New("--control-plane needs the identity service, which --static does without: drop one of them")
	}
	if c.follow && c.configFile == "" {
		return c, errors.New("--control-plane needs --config for the proxy's workload and listeners")
	}
	if c.advertiseIP != "" {
		if _, err := netip.ParseAddr(c.advertiseIP); err != nil {
			return c, fmt.Errorf("--advertise-ip %q is not an IP address", c.advertiseIP)
		}
	}
	if c.static != "" {
		return c, nil
	}
	if c.joinTokenFile != "" && c.kubeTokenFile != "" {
		return c, errors.New("--join-token-file and --kubernetes-token-file are two ways to prove the identity: give one")
	}
	credential := c.joinTokenFile + c.kubeTokenFile
	var missing []string
	for _, f := range []struct{ name, val string }{
		{"--ca-bundle", c.caBundle}, {"--namespace", c.namespace}, {"--service-account", c.serviceAccount}, {"--join-token-file (or --kubernetes-token-file)", credential},
	} {
		if f.val == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return c, fmt.Errorf("missing %s: give them to obtain an identity from the identity service, or use --static DIR", strings.Join(missing, ", "))
	}
	return c, nil
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "intercept" {
		return runIntercept(args[1:], stderr)
	}
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	var pcfg *proxyconfig.Config
	if cfg.configFile != "" {
		if pcfg, err = proxyconfig.Load(cfg.configFile, cfg.namespace); err != nil {
			return err
		}
	}

	var (
		holder   *identity.Holder
		source   string
		runAgent func(context.Context) error // never nil once set below
	)
	if cfg.static != "" {
		svid, err := identity.LoadFiles(cfg.static, time.Now())
		if err != nil {
			return err
		}
		holder = &identity.Holder{}
		holder.Set(svid)
		source = "static " + cfg.static
		log.Info("identity loaded from files", "id", svid.ID, "notAfter", svid.NotAfter().UTC())
		runAgent = func(ctx context.Context) error {
			identity.WatchFiles(ctx, cfg.static, holder, 10*time.Second, log)
			return nil
		}
	} else {
		src, err := newSource(cfg, log, controlPlaneDial(pcfg))
		if err != nil {
			return err
		}
		holder = &src.Holder
		source = "identity-service " + cfg.identityAddr
		runAgent = src.Run
	}

	var px *proxy.Proxy
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if cfg.configFile != "" {
		if cfg.follow && pcfg.Policies != "" {
			return fmt.Errorf("%s sets policies, but with --control-plane they come from the control plane: remove the policies field", cfg.configFile)
		}
		if cfg.follow && pcfg.Workload.Namespace != cfg.namespace {
			return fmt.Errorf("%s: workload.namespace %q differs from --namespace %q: a proxy registers in the namespace of its identity", cfg.configFile, pcfg.Workload.Namespace, cfg.namespace)
		}
		px, err = proxy.New(proxy.Options{Config: pcfg, Identity: holder, Log: log, Metrics: proxy.NewMetrics(reg), AwaitUpdate: cfg.follow})
		if err != nil {
			return err
		}
	}
	var follower *discovery.Client
	if cfg.follow {
		if follower, err = newFollower(cfg, pcfg, holder, px, log); err != nil {
			return err
		}
	}

	lis, err := net.Listen("tcp", cfg.adminAddr)
	if err != nil {
		return fmt.Errorf("admin endpoints: %w (choose another --admin-addr)", err)
	}
	ctx, shutdown := context.WithCancel(ctx)
	defer shutdown()
	endpoints := admin.Endpoints{
		Ready: func() bool {
			if follower != nil {
				select {
				case <-follower.Synced():
				default:
					return false // no configuration yet
				}
			}
			if px != nil {
				return px.Ready()
			}
			return holder.Current() != nil
		},
		State: func() admin.State {
			st := adminState(holder, source)
			if px != nil {
				st.PolicyVersion = px.PolicyVersion()
				st.ConfigVersion = px.ConfigVersion()
				st.Config = pcfg
			}
			return st
		},
		Metrics:   promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
		Shutdown:  shutdown,
		Profiling: cfg.pprof,
	}
	if pcfg != nil && len(pcfg.AppProbes) > 0 {
		endpoints.AppHealth = proxy.AppHealth(pcfg.AppProbes)
	}
	servers := []*http.Server{{Handler: admin.Handler(endpoints), ReadHeaderTimeout: 5 * time.Second}}
	listeners := []net.Listener{lis}
	if cfg.statsAddr != "" {
		statsLis, err := net.Listen("tcp", cfg.statsAddr)
		if err != nil {
			lis.Close()
			return fmt.Errorf("stats endpoints: %w (choose another --stats-addr)", err)
		}
		servers = append(servers, &http.Server{Handler: admin.StatsHandler(endpoints), ReadHeaderTimeout: 5 * time.Second})
		listeners = append(listeners, statsLis)
		log.Info("stats endpoints listening", "addr", statsLis.Addr().String())
	}
	log.Info("admin endpoints listening", "addr", lis.Addr().String())

	eg, ctx := errgroup.WithContext(ctx)
	// Keeps the identity current: renewal from the identity service, or
	// re-reading the static files.
	eg.Go(func() error { return runAgent(ctx) })
	if px != nil {
		eg.Go(func() error { return px.Run(ctx) })
	}
	if follower != nil {
		eg.Go(func() error { return follower.Run(ctx) })
	}
	for i, srv := range servers {
		eg.Go(func() error {
			if err := srv.Serve(listeners[i]); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		eg.Go(func() error {
			<-ctx.Done()
			shutdownCtx, cancel := context.WithTimeout(context.Background(), proxy.DrainTimeout+time.Second)
			defer cancel()
			return srv.Shutdown(shutdownCtx)
		})
	}
	err = eg.Wait()
	log.Info("stopped")
	return err
}

// controlPlaneDial returns the dial options for the control plane's
// services. Under transparent interception the proxy's own connections to
// it must carry the bypass mark, or the rules would send them back to the
// proxy's outbound listener.
func controlPlaneDial(pcfg *proxyconfig.Config) []grpc.DialOption {
	if pcfg == nil || !pcfg.Transparent.MarksSockets() {
		return nil
	}
	return []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		d := net.Dialer{Control: intercept.MarkControl}
		return d.DialContext(ctx, "tcp", addr)
	})}
}

func newSource(cfg config, log *slog.Logger, dial []grpc.DialOption) (*identity.Source, error) {
	td, err := spiffeid.TrustDomainFromString(cfg.trustDomain)
	if err != nil {
		return nil, fmt.Errorf("--trust-domain %q: %w", cfg.trustDomain, err)
	}
	id, err := meshid.Workload(td, cfg.namespace, cfg.serviceAccount)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(cfg.caBundle)
	if err != nil {
		return nil, fmt.Errorf("--ca-bundle: %w", err)
	}
	bundle, err := certpem.ParseCerts(pem)
	if err != nil {
		return nil, fmt.Errorf("--ca-bundle %s: %w", cfg.caBundle, err)
	}
	credFile, credType := cfg.joinTokenFile, identity.CredentialJoinToken
	if cfg.kubeTokenFile != "" {
		credFile, credType = cfg.kubeTokenFile, identity.CredentialKubernetes
	}
	if _, err := os.Stat(credFile); err != nil {
		return nil, fmt.Errorf("credential: %w", err)
	}
	return identity.NewSource(identity.Config{
		Log: log, Addr: cfg.identityAddr, ID: id, ServerID: meshid.ControlPlane(td), Bundle: bundle, TTL: cfg.ttl,
		CredentialFile: credFile, CredentialType: credType,
		DialOptions: dial,
	})
}

// newFollower builds the control plane client: it registers an instance of
// the configured workload with the address of each inbound port and
// applies what it is pushed.
func newFollower(cfg config, pcfg *proxyconfig.Config, holder *identity.Holder, px *proxy.Proxy, log *slog.Logger) (*discovery.Client, error) {
	td, err := spiffeid.TrustDomainFromString(cfg.trustDomain)
	if err != nil {
		return nil, fmt.Errorf("--trust-domain %q: %w", cfg.trustDomain, err)
	}
	instance := cfg.instance
	if instance == "" {
		if instance, err = os.Hostname(); err != nil {
			return nil, fmt.Errorf("--instance not given and no host name: %w", err)
		}
		instance = strings.ToLower(instance)
	}
	ports, err := discovery.PortAddresses(pcfg, cfg.advertiseIP)
	if err != nil {
		return nil, err
	}
	stats := ""
	if cfg.statsAddr != "" {
		if stats, err = discovery.Advertised(cfg.statsAddr, cfg.advertiseIP); err != nil {
			return nil, fmt.Errorf("--stats-addr: %w", err)
		}
	}
	return discovery.New(discovery.Config{
		Addr: cfg.identityAddr, ServerID: meshid.ControlPlane(td), Holder: holder,
		Workload: pcfg.Workload.Name, Instance: instance, Ports: ports, StatsAddress: stats, Log: log.With("component", "discovery"),
		DialOptions: controlPlaneDial(pcfg),
		Tapper:      px,
		Apply: func(u *discoveryv1.Update) error {
			pu, err := discovery.ProxyUpdate(u)
			if err != nil {
				return err
			}
			return px.Apply(pu)
		},
	})
}

func adminState(h *identity.Holder, source string) admin.State {
	st := admin.State{Source: source}
	svid := h.Current()
	if svid == nil {
		return st
	}
	leaf := svid.Chain[0]
	id := &admin.Identity{
		SPIFFEID:        svid.ID.String(),
		Serial:          leaf.SerialNumber.Text(16),
		NotBefore:       leaf.NotBefore.UTC(),
		NotAfter:        leaf.NotAfter.UTC(),
		SecondsToExpiry: time.Until(leaf.NotAfter).Seconds(),
	}
	for _, r := range svid.Bundle {
		sum := sha256.Sum256(r.Raw)
		id.TrustBundle = append(id.TrustBundle, hex.EncodeToString(sum[:]))
	}
	st.Identity = id
	return st
}
