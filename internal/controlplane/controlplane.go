// Package controlplane runs Trellis' control plane: the CA and identity
// service, the discovery service that pushes each proxy its configuration,
// the registry of workloads and services, the watched directory of policy
// resources, and the authenticated admin API that the CLI (and the
// dashboard) read.
package controlplane

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/dirwatch"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/jointoken"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/push"
	"github.com/trellis-mesh/trellis/internal/registry"
	"github.com/trellis-mesh/trellis/internal/statefile"
	"github.com/trellis-mesh/trellis/internal/telemetry"
)

// Files in the state directory besides the CA's and the join tokens'.
const (
	// AdminTokenFile holds the admin API's bearer credential (0600).
	AdminTokenFile = "admin-token"
	// EndpointsFile says where a running control plane serves, so the CLI
	// finds it from the state directory alone.
	EndpointsFile     = "control-plane.json"
	registrationsFile = "registrations.json"
	// lastGoodFile keeps the last valid resources, so that a restart
	// while the directory holds a rejected edit starts from them.
	lastGoodFile = "resources-last-good.json"
	// restoreGrace keeps restored registrations long enough for proxies
	// to reconnect: their backoff reaches a minute (plus jitter).
	restoreGrace    = 3 * time.Minute
	caCheckInterval = 10 * time.Second
)

// Options configure a ControlPlane.
type Options struct {
	Config *Config
	Log    *slog.Logger
	// Init creates the CA when the state directory has none.
	Init bool
	// Coalesce overrides push.DefaultCoalesce (tests).
	Coalesce time.Duration
	// Kubernetes, when set, takes workloads, services and resources from
	// a cluster instead of the configuration.
	Kubernetes *Kubernetes
	// OnExternalAddresses, when set, is told the virtual IP of every
	// ServiceEntry host (Config.ExternalAddresses) whenever resources are
	// put in force: the local runtime writes them to its hosts files.
	OnExternalAddresses func(map[string]netip.Addr)
}

// ControlPlane is one running control plane.
type ControlPlane struct {
	cfg      *Config
	log      *slog.Logger
	ca       *ca.CA
	identity *identityservice.Service
	registry *registry.Registry
	push     *push.Server
	// telemetry scrapes the proxies for the traffic view.
	telemetry *telemetry.Collector
	token     string
	// closing is closed when Run stops serving, ending event streams.
	closing chan struct{}
	// onExternal is Options.OnExternalAddresses.
	onExternal func(map[string]netip.Addr)
	kube       *Kubernetes
	// resourcesApplied is closed once the cluster's resources were first
	// put in force (Kubernetes only).
	resourcesApplied chan struct{}
	appliedOnce      sync.Once

	grpcLis, adminLis net.Listener
	// webhookLis serves the sidecar injector (Kubernetes only).
	webhookLis net.Listener

	reloadMu  sync.Mutex
	mu        sync.Mutex
	resources ResourceStatus
	stamp     string // dirwatch.Stamp of the directory last loaded
}

// ResourceStatus reports the watched resource directory.
type ResourceStatus struct {
	Directory string `json:"directory,omitempty"`
	// Version identifies the files in force.
	Version  string    `json:"version"`
	LoadedAt time.Time `json:"loadedAt,omitzero"`
	Files    []string  `json:"files,omitempty"`
	// Error is the last rejected change; the previous resources stay in
	// force until the directory is valid again.
	Error      []ResourceError `json:"error,omitempty"`
	RejectedAt time.Time       `json:"rejectedAt,omitzero"`
	Warnings   []ResourceError `json:"warnings,omitempty"`
}

// ResourceError is one problem in a resource file.
type ResourceError struct {
	File     string `json:"file,omitempty"`
	Line     int    `json:"line,omitempty"`
	Resource string `json:"resource,omitempty"`
	Field    string `json:"field,omitempty"`
	Message  string `json:"message"`
}

// New opens (or with Init creates) the state, loads the resources and
// binds the listeners; Run serves.
func New(opts Options) (*ControlPlane, error) {
	cfg := opts.Config
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Kubernetes != nil {
		if err := checkKubernetesConfig(cfg); err != nil {
			return nil, err
		}
		k := *opts.Kubernetes // New fills in WebhookURL: the caller's stays
		opts.Kubernetes = &k
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if k := opts.Kubernetes; k != nil {
		if err := restoreCA(k, cfg.StateDir); err != nil {
			return nil, err
		}
	}
	caCfg := ca.Config{StateDir: cfg.StateDir, Log: log}
	authority, err := ca.Load(caCfg)
	if errors.Is(err, ca.ErrNotInitialized) && opts.Init {
		init := ca.InitOptions{TrustDomain: cfg.TrustDomain}
		if k := opts.Kubernetes; k != nil && k.RootSecret != "" {
			if init.RootCertPEM, init.RootKeyPEM, err = rootFromSecret(k); err != nil {
				return nil, err
			}
			log.Info("no CA in the state directory; creating one from the root in a secret", "secret", k.RootSecret, "trustDomain", cfg.TrustDomain)
		} else {
			log.Info("no CA in the state directory; creating one", "dir", cfg.StateDir, "trustDomain", cfg.TrustDomain)
		}
		authority, err = ca.Init(caCfg, init)
		if k := opts.Kubernetes; err == nil && k != nil {
			// Several control planes may have started together: one CA.
			won, cerr := claimCA(k, cfg.StateDir)
			switch {
			case cerr != nil:
				err = cerr
			case !won:
				log.Info("another control plane created the CA first; taking its", "secret", k.CASecret)
				if err = os.Remove(filepath.Join(cfg.StateDir, ca.StateFile)); err == nil {
					// Its bundle.pem is rewritten below.
					if err = restoreCA(k, cfg.StateDir); err == nil {
						authority, err = ca.Load(caCfg)
					}
				}
			}
		}
	}
	if err != nil {
		return nil, err
	}
	// The CLI verifies the admin API with bundle.pem: a CA restored from
	// a Secret (or taken from another control plane) comes without it.
	if err := statefile.WriteAtomic(ca.BundlePath(cfg.StateDir), certpem.EncodeCerts(authority.Bundle()...), 0o644); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if td := authority.TrustDomain().Name(); td != cfg.TrustDomain {
		return nil, fmt.Errorf("trustDomain: the CA in %s is for %q, the configuration says %q; fix the configuration or use another stateDir", cfg.StateDir, td, cfg.TrustDomain)
	}
	token, err := adminToken(filepath.Join(cfg.StateDir, AdminTokenFile))
	if err != nil {
		return nil, err
	}
	cp := &ControlPlane{cfg: cfg, log: log, ca: authority, token: token, kube: opts.Kubernetes, resourcesApplied: make(chan struct{})}
	auths := []identityservice.Authenticator{
		identityservice.JoinTokens{Store: jointoken.NewStore(cfg.StateDir, nil), TrustDomain: authority.TrustDomain()},
	}
	if k := opts.Kubernetes; k != nil && k.Authenticator != nil {
		auths = append(auths, k.Authenticator)
	}
	cp.identity = identityservice.New(identityservice.Config{
		CA:             authority,
		Log:            log.With("component", "identity"),
		Authenticators: auths,
		// A pod's token goes with every request: its deletion ends its
		// proxy's renewals.
		RequireCredential: opts.Kubernetes != nil,
	})
	var pushServer *push.Server
	cp.registry, err = registry.New(registry.Config{
		Declarations: cfg.Registry(),
		GracePeriod:  time.Duration(*cfg.GracePeriod),
		RestoreGrace: restoreGrace,
		StateFile:    filepath.Join(cfg.StateDir, registrationsFile),
		Pending:      opts.Kubernetes != nil,
		OnChange:     func() { pushServer.Changed() },
		Log:          log.With("component", "registry"),
	})
	if err != nil {
		return nil, err
	}
	pushServer = push.New(push.Config{
		Registry:      cp.registry,
		Verify:        cp.verifyPeer,
		Coalesce:      opts.Coalesce,
		RegistryOnly:  cfg.RegistryOnly(),
		ExternalRange: cfg.externalRange(),
		Encoded:       true,
		Hold:          opts.Kubernetes != nil,
		Log:           log.With("component", "push"),
	})
	cp.push = pushServer
	cp.telemetry = newCollector(cp)
	cp.closing = make(chan struct{})
	cp.onExternal = opts.OnExternalAddresses
	switch {
	case cfg.Resources != "":
		if err := cp.loadInitial(); err != nil {
			return nil, err
		}
	case opts.Kubernetes != nil:
		// Until the cluster's resources are listed: the last valid ones.
		cp.resources = ResourceStatus{Directory: "kubernetes", Version: "none"}
		if last, err := cp.loadLastGood(); err == nil {
			cp.install(last, "last-good")
		}
	default:
		cp.resources = ResourceStatus{Version: "none"}
	}
	cp.grpcLis, err = net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen: %w (is another control plane running? change listen)", err)
	}
	cp.adminLis, err = net.Listen("tcp", cfg.AdminListen)
	if err != nil {
		cp.grpcLis.Close()
		return nil, fmt.Errorf("adminListen: %w (is another control plane running? change adminListen)", err)
	}
	if k := opts.Kubernetes; k != nil && k.WebhookListen != "" {
		if cp.webhookLis, err = net.Listen("tcp", k.WebhookListen); err != nil {
			cp.grpcLis.Close()
			cp.adminLis.Close()
			return nil, fmt.Errorf("webhook listen: %w", err)
		}
		if k.WebhookURL == "auto" {
			// Outside the cluster: the API server calls the listener.
			if ap, err := netip.ParseAddrPort(cp.webhookLis.Addr().String()); err != nil || ap.Addr().IsUnspecified() {
				cp.grpcLis.Close()
				cp.adminLis.Close()
				cp.webhookLis.Close()
				return nil, fmt.Errorf("--webhook-url auto needs a --webhook-listen address the API server can call, not %s", cp.webhookLis.Addr())
			}
			k.WebhookURL = "https://" + cp.webhookLis.Addr().String() + install.WebhookPath
		}
	}
	if err := cp.writeEndpoints(); err != nil {
		cp.grpcLis.Close()
		cp.adminLis.Close()
		if cp.webhookLis != nil {
			cp.webhookLis.Close()
		}
		return nil, err
	}
	return cp, nil
}

// adminToken reads the admin credential, creating it on first use.
func adminToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
			return "", fmt.Errorf("admin credential %s is readable by others (mode %v): run chmod 600 on it", path, fi.Mode().Perm())
		}
		if t := strings.TrimSpace(string(data)); len(t) >= 32 {
			return t, nil
		}
		return "", fmt.Errorf("admin credential %s is too short: delete it to have a new one generated", path)
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("admin credential: %w", err)
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	t := hex.EncodeToString(b)
	if err := statefile.WriteAtomic(path, []byte(t+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("admin credential: %w", err)
	}
	return t, nil
}

// verifyPeer checks a proxy's certificate chain against the bundle in force.
func (cp *ControlPlane) verifyPeer(chain []*x509.Certificate) (spiffeid.ID, error) {
	bundle := x509bundle.FromX509Authorities(cp.ca.TrustDomain(), cp.ca.Bundle())
	id, _, err := x509svid.Verify(chain, bundle)
	if err != nil {
		return spiffeid.ID{}, err
	}
	if id == meshid.ControlPlane(cp.ca.TrustDomain()) {
		return spiffeid.ID{}, errors.New("the control plane's own identity is not a proxy")
	}
	return id, nil
}

// Addr returns the address proxies connect to.
func (cp *ControlPlane) Addr() string { return cp.grpcLis.Addr().String() }

// AdminAddr returns the admin API's address.
func (cp *ControlPlane) AdminAddr() string { return cp.adminLis.Addr().String() }

// CA returns the certificate authority.
func (cp *ControlPlane) CA() *ca.CA { return cp.ca }

// Run serves until ctx ends.
func (cp *ControlPlane) Run(ctx context.Context) error {
	g := grpc.NewServer(
		grpc.Creds(cp.identity.ServerCredentials()),
		// Small buffers: one control plane holds a stream per proxy, and
		// updates are small.
		// Updates are encoded once per view, not once per proxy.
		grpc.ForceServerCodecV2(push.Codec{}),
		// Writes go out in 64 KB (through buffers that idle connections
		// give back, gRPC's default), so a large update costs few system
		// calls and an idle proxy little memory.
		grpc.WriteBufferSize(64<<10),
		grpc.ReadBufferSize(8<<10),
		// Proxies send small messages; a CSR or a Hello is a few KB.
		grpc.MaxRecvMsgSize(256<<10),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	cp.identity.Register(g)
	discoveryv1.RegisterDiscoveryServer(g, cp.push)
	admin := &http.Server{
		Handler:           cp.adminHandler(),
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: cp.identity.TLSConfig().GetCertificate,
		},
	}
	cp.log.Info("control plane serving", "proxies", cp.Addr(), "admin", "https://"+cp.AdminAddr(),
		"trustDomain", cp.cfg.TrustDomain, "stateDir", cp.cfg.StateDir, "resources", cp.cfg.Resources)

	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return cp.ca.Run(ctx, caCheckInterval) })
	eg.Go(func() error { return cp.push.Run(ctx) })
	eg.Go(func() error { return cp.maintainRegistry(ctx) })
	eg.Go(func() error { return cp.telemetry.Run(ctx) })
	if cp.kube != nil {
		cp.runKubernetes(ctx, cp.kube, eg.Go)
	}
	if cp.cfg.Resources != "" {
		eg.Go(func() error {
			return dirwatch.Watch(ctx, dirwatch.Config{Dir: cp.cfg.Resources, Since: cp.resourceStamp(), OnChange: cp.reload, Log: cp.log})
		})
	}
	eg.Go(func() error {
		if err := g.Serve(cp.grpcLis); !errors.Is(err, grpc.ErrServerStopped) {
			return err
		}
		return nil
	})
	eg.Go(func() error {
		if err := admin.ServeTLS(cp.adminLis, "", ""); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	eg.Go(func() error {
		<-ctx.Done()
		// Streams never finish on their own: end them (proxies keep
		// their configuration and reconnect), and give in-flight unary
		// calls a moment.
		cp.push.Shutdown()
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(time.Second):
			g.Stop()
		}
		close(cp.closing) // event streams end
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if admin.Shutdown(shutdownCtx) != nil {
			admin.Close() // streams that did not end in time
		}
		_ = os.Remove(filepath.Join(cp.cfg.StateDir, EndpointsFile))
		return nil
	})
	err := eg.Wait()
	if serr := cp.registry.Save(); serr != nil {
		cp.log.Error("saving registrations failed", "err", serr)
	}
	return err
}

// maintainRegistry expires instances past their grace period and saves
// the registrations, at most once a second.
func (cp *ControlPlane) maintainRegistry(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cp.registry.Expire()
		if err := cp.registry.Save(); err != nil {
			cp.log.Error("saving registrations failed; retrying", "err", err)
		}
	}
}

// Endpoints is the content of EndpointsFile.
type Endpoints struct {
	Admin       string `json:"admin"`
	Proxies     string `json:"proxies"`
	TrustDomain string `json:"trustDomain"`
	PID         int    `json:"pid"`
}

func (cp *ControlPlane) writeEndpoints() error {
	data, _ := json.MarshalIndent(Endpoints{Admin: cp.AdminAddr(), Proxies: cp.Addr(), TrustDomain: cp.cfg.TrustDomain, PID: os.Getpid()}, "", "  ")
	return statefile.WriteAtomic(filepath.Join(cp.cfg.StateDir, EndpointsFile), data, 0o600)
}

// loadInitial loads the resource directory at startup. If it holds a
// rejected edit, the last valid resources (saved in the state directory)
// are put in force and the problem is reported, as it would be had the
// control plane kept running; with nothing saved, startup fails.
func (cp *ControlPlane) loadInitial() error {
	stamp := dirwatch.Stamp(cp.cfg.Resources)
	set, err := cp.loadResources()
	if err == nil {
		cp.install(set, stamp)
		return nil
	}
	last, lerr := cp.loadLastGood()
	if lerr == nil {
		// The mesh may have changed since they were valid.
		lerr = cp.checkMesh(last)
	}
	if lerr != nil {
		return fmt.Errorf("resources %s: %w", cp.cfg.Resources, err)
	}
	cp.log.Error("resources rejected; starting with the last valid ones", "dir", cp.cfg.Resources, "err", err)
	cp.install(last, "last-good")
	cp.mu.Lock()
	cp.stamp = stamp
	cp.resources.Error = resourceErrors(err)
	cp.resources.RejectedAt = time.Now()
	cp.mu.Unlock()
	return nil
}

// loadResources loads the resource directory and checks it against the
// mesh (checkMesh).
func (cp *ControlPlane) loadResources() (*policy.Set, error) {
	set, err := policy.LoadDir(cp.cfg.Resources)
	if err != nil {
		return nil, err
	}
	if err := cp.checkMesh(set); err != nil {
		return nil, err
	}
	return set, nil
}

// checkMesh checks what the loader cannot alone: a ServiceEntry host must
// not be a mesh service's name, which the sidecars route as the service;
// an HTTPRoute attaches to a gateway of the mesh that admits routes of its
// namespace, and sends to a service of its own namespace (the Gateway
// API's defaults, without ReferenceGrants) and one of its ports.
func (cp *ControlPlane) checkMesh(set *policy.Set) error {
	var errs policy.Errors
	// The mesh's services: the configuration's, or the cluster's.
	services := cp.registry.Snapshot().Declarations.Services
	names := map[string]string{}
	for _, s := range services {
		for _, n := range meshid.ServiceHostNames(s.Name + "." + s.Namespace) {
			names[n] = s.Namespace + "/" + s.Name
		}
	}
	for _, se := range set.ServiceEntries {
		for i, h := range se.Spec.Hosts {
			if svc, ok := names[strings.ToLower(h)]; ok {
				errs = append(errs, &policy.Error{File: se.Location.File, Document: se.Location.Document, Line: se.Location.Line,
					Resource: policy.KindServiceEntry + " " + se.Metadata.Ref(), Field: fmt.Sprintf("spec.hosts[%d]", i),
					Message: fmt.Sprintf("%s is the name of mesh service %s, reached over the mesh's mTLS: a ServiceEntry names hosts outside the mesh", h, svc)})
			}
		}
	}
	gateways := map[string]Workload{}
	for _, w := range cp.cfg.Workloads {
		if w.Gateway {
			gateways[w.Namespace+"/"+w.Name] = w
		}
	}
	servicePorts := map[string][]uint32{}
	for _, s := range services {
		for _, p := range s.Ports {
			servicePorts[s.Namespace+"/"+s.Name] = append(servicePorts[s.Namespace+"/"+s.Name], p.Port)
		}
	}
	for _, hr := range set.HTTPRoutes {
		bad := func(field, format string, args ...any) {
			errs = append(errs, &policy.Error{File: hr.Location.File, Document: hr.Location.Document, Line: hr.Location.Line,
				Resource: policy.KindHTTPRoute + " " + hr.Metadata.Ref(), Field: field, Message: fmt.Sprintf(format, args...)})
		}
		ns := hr.Metadata.Namespace
		for i, g := range hr.Spec.Gateways {
			w, ok := gateways[g]
			switch {
			case !ok:
				bad(fmt.Sprintf("spec.parentRefs[%d]", i), "%s is not a gateway workload of the mesh (a workload with gateway: in the mesh file)", g)
			case w.Namespace != ns && !slices.Contains(w.RouteNamespaces, ns) && !slices.Contains(w.RouteNamespaces, "*"):
				bad(fmt.Sprintf("spec.parentRefs[%d]", i), "gateway %s admits routes of namespace %s and %v only: add %s to its routeNamespaces", g, w.Namespace, w.RouteNamespaces, ns)
			}
		}
		for i, r := range hr.Spec.Rules {
			ports, ok := servicePorts[r.Backend]
			switch {
			case !strings.HasPrefix(r.Backend, ns+"/"):
				bad(fmt.Sprintf("spec.rules[%d].backendRefs[0].namespace", i), "%s is in another namespace than the route: put the route in the service's namespace (cross-namespace backends need grants, not supported yet)", r.Backend)
			case !ok:
				bad(fmt.Sprintf("spec.rules[%d].backendRefs[0]", i), "%s is not a service of the mesh", r.Backend)
			case !slices.Contains(ports, r.BackendPort):
				bad(fmt.Sprintf("spec.rules[%d].backendRefs[0].port", i), "service %s has no port %d (it has %v)", r.Backend, r.BackendPort, ports)
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// saveLastGood keeps the files of a valid set: every kind of resource, as
// written, parsed again at a restart that finds the directory invalid.
func (cp *ControlPlane) saveLastGood(set *policy.Set) {
	data, err := json.Marshal(set.Sources)
	if err == nil {
		err = statefile.WriteAtomic(filepath.Join(cp.cfg.StateDir, lastGoodFile), data, 0o600)
	}
	if err != nil {
		cp.log.Error("saving the last valid resources failed", "err", err)
	}
}

func (cp *ControlPlane) loadLastGood() (*policy.Set, error) {
	data, err := os.ReadFile(filepath.Join(cp.cfg.StateDir, lastGoodFile))
	if err != nil {
		return nil, err
	}
	var sources []policy.SourceFile
	if err := json.Unmarshal(data, &sources); err != nil {
		return nil, fmt.Errorf("%s: %w", lastGoodFile, err)
	}
	return policy.ParseSources(sources)
}

// reload loads the resource directory after a change; an invalid directory
// is reported and the previous resources stay in force. Reloads are
// serialized, so a slow one cannot install an older directory over a newer.
func (cp *ControlPlane) reload() {
	cp.reloadMu.Lock()
	defer cp.reloadMu.Unlock()
	stamp := dirwatch.Stamp(cp.cfg.Resources)
	if stamp == cp.resourceStamp() {
		return
	}
	set, err := cp.loadResources()
	if err != nil {
		cp.mu.Lock()
		cp.stamp = stamp
		cp.resources.Error = resourceErrors(err)
		cp.resources.RejectedAt = time.Now()
		cp.mu.Unlock()
		cp.log.Error("resource change rejected; the previous configuration stays in force", "dir", cp.cfg.Resources, "err", err)
		return
	}
	cp.install(set, stamp)
	cp.log.Info("resources reloaded", "dir", cp.cfg.Resources, "version", stamp,
		"peerAuthentications", len(set.PeerAuthentications), "authorizationPolicies", len(set.AuthorizationPolicies))
}

// Sync takes in any change to the resource directory the watcher has not
// reported yet and recomputes every proxy's view now, so that a status
// read afterwards compares the proxies with everything written before the
// call: what `trellis status --wait` needs to be safe right after an edit.
func (cp *ControlPlane) Sync() {
	if cp.cfg.Resources != "" {
		cp.reload()
	}
	cp.push.Sync()
}

// resourceStamp is the listing stamp of the resources in force (or last
// rejected), so that changes made before the watch starts are not missed.
func (cp *ControlPlane) resourceStamp() string {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.stamp
}

func (cp *ControlPlane) install(set *policy.Set, stamp string) {
	if stamp != "last-good" {
		cp.saveLastGood(set)
	}
	cp.mu.Lock()
	cp.stamp = stamp
	dir := cp.cfg.Resources
	if cp.kube != nil {
		dir = "kubernetes"
	}
	cp.resources = ResourceStatus{Directory: dir, Version: stamp, LoadedAt: time.Now(), Files: set.Files}
	for _, w := range set.Warnings {
		cp.resources.Warnings = append(cp.resources.Warnings, ResourceError{File: w.File, Line: w.Line, Resource: w.Resource, Field: w.Field, Message: w.Message})
	}
	cp.resources.Warnings = append(cp.resources.Warnings, tlsFileWarnings(set, time.Now())...)
	cp.mu.Unlock()
	cp.push.SetPolicies(set)
	if cp.onExternal != nil {
		cp.onExternal(push.ExternalAddresses(set, cp.cfg.externalRange()))
	}
}

func resourceErrors(err error) []ResourceError {
	var perrs policy.Errors
	if errors.As(err, &perrs) {
		out := make([]ResourceError, 0, len(perrs))
		for _, e := range perrs {
			out = append(out, ResourceError{File: e.File, Line: e.Line, Resource: e.Resource, Field: e.Field, Message: e.Message})
		}
		return out
	}
	return []ResourceError{{Message: err.Error()}}
}
