package controlplane

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"

	"github.com/trellis-mesh/trellis/internal/ca"
	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/install"
	"github.com/trellis-mesh/trellis/internal/k8s/resources"
	"github.com/trellis-mesh/trellis/internal/k8s/webhook"
	"github.com/trellis-mesh/trellis/internal/k8s/workloads"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/registry"
	"github.com/trellis-mesh/trellis/internal/statefile"
)

// Kubernetes connects a control plane to a cluster, which then declares
// the workloads (injected pods) and services, and whose custom resources
// take the place of the resource directory.
type Kubernetes struct {
	Client  kubernetes.Interface
	Dynamic dynamic.Interface
	// Authenticator checks the service account tokens of pods' proxies
	// (a TokenReview); nil leaves proxies only join tokens.
	Authenticator identityservice.Authenticator
	// Inject is what the sidecar injector gives pods (the proxy image,
	// the address proxies reach the control plane at).
	Inject inject.Config
	// WebhookListen serves the injector (HTTPS); empty serves none.
	WebhookListen string
	// CASecret, "namespace/name", keeps the CA (its state file, keys
	// included) in a Secret, so that a control plane whose state directory
	// is an emptyDir restarts with the same CA; empty keeps it in the state
	// directory only.
	CASecret string
	// LeaderElect makes the control planes sharing CASecret elect one
	// (a Lease named like the Secret) that keeps the CA in it — the
	// intermediate it rotates; the others take the CA from the Secret.
	LeaderElect bool
	// RootSecret, "namespace/name", is a kubernetes.io/tls Secret whose
	// tls.crt and tls.key are the root the CA is made from (the control
	// plane makes its intermediate), such as a CA cert-manager keeps;
	// empty: a root of its own. Read only when the CA is first created.
	RootSecret string
	// WebhookURL, when set, is written into the webhook configuration in
	// place of its Service, for a control plane outside the cluster;
	// "auto" is the WebhookListen listener's own address.
	WebhookURL string
}

// checkKubernetesConfig refuses what the cluster replaces.
func checkKubernetesConfig(cfg *Config) error {
	var errs []error
	if cfg.Resources != "" {
		errs = append(errs, errors.New("resources: the cluster's custom resources take its place with a cluster: remove it"))
	}
	if len(cfg.Workloads) > 0 || len(cfg.Services) > 0 {
		errs = append(errs, errors.New("workloads, services: the cluster declares them (pods and Services) with a cluster: remove them"))
	}
	return errors.Join(errs...)
}

// restoreCA writes the CA kept in the Secret into an empty state
// directory, before the CA is loaded.
func restoreCA(k *Kubernetes, dir string) error {
	if k.CASecret == "" {
		return nil
	}
	path := filepath.Join(dir, ca.StateFile)
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	ns, name, _ := strings.Cut(k.CASecret, "/")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sec, err := k.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil // a new CA: --init makes it, mirrorCA keeps it
	}
	if err != nil {
		return fmt.Errorf("CA secret %s: %w", k.CASecret, err)
	}
	data, ok := sec.Data[ca.StateFile]
	if !ok {
		return fmt.Errorf("CA secret %s has no key %s: it is not a Trellis CA; remove it or name another with --ca-secret", k.CASecret, ca.StateFile)
	}
	return statefile.WriteAtomic(path, data, 0o600)
}

// claimCA publishes a CA just made into the Secret, if none is there: of
// control planes starting together, the first to create the Secret wins,
// and the others (won == false) must take its CA instead of their own.
func claimCA(k *Kubernetes, dir string) (won bool, err error) {
	if k.CASecret == "" {
		return true, nil
	}
	data, err := os.ReadFile(filepath.Join(dir, ca.StateFile))
	if err != nil {
		return false, err
	}
	ns, name, _ := strings.Cut(k.CASecret, "/")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = k.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/part-of": "trellis"}},
		Data:       map[string][]byte{ca.StateFile: data},
	}, metav1.CreateOptions{})
	switch {
	case err == nil:
		return true, nil
	case apierrors.IsAlreadyExists(err):
		return false, nil
	default:
		return false, fmt.Errorf("CA secret %s: %w", k.CASecret, err)
	}
}

// rootFromSecret reads the root a new CA is made from.
func rootFromSecret(k *Kubernetes) (cert, key []byte, err error) {
	ns, name, _ := strings.Cut(k.RootSecret, "/")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sec, err := k.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("root secret %s: %w", k.RootSecret, err)
	}
	cert, key = sec.Data[corev1.TLSCertKey], sec.Data[corev1.TLSPrivateKeyKey]
	if len(cert) == 0 || len(key) == 0 {
		return nil, nil, fmt.Errorf("root secret %s has no %s and %s: give a kubernetes.io/tls Secret holding the root certificate and its key", k.RootSecret, corev1.TLSCertKey, corev1.TLSPrivateKeyKey)
	}
	return cert, key, nil
}

// syncCA keeps the CA and its Secret one until ctx ends: the leader (the
// only control plane without LeaderElect) writes its CA into the Secret
// when it changes (the intermediate rotated); the others take the
// leader's from it, so that every replica signs under the same issuer.
func (cp *ControlPlane) syncCA(ctx context.Context, k *Kubernetes, leading func() bool) error {
	ns, name, _ := strings.Cut(k.CASecret, "/")
	secrets := k.Client.CoreV1().Secrets(ns)
	path := filepath.Join(cp.cfg.StateDir, ca.StateFile)
	t := time.NewTicker(caCheckInterval)
	defer t.Stop()
	var mirrored []byte
	for {
		var err error
		if leading() {
			var data []byte
			data, err = os.ReadFile(path)
			if err == nil && !bytes.Equal(data, mirrored) {
				if err = writeSecret(ctx, secrets, ns, name, data); err == nil {
					mirrored = data
					cp.log.Info("CA kept in its secret", "secret", k.CASecret)
				}
			}
		} else {
			mirrored = nil // a new leader writes again
			err = cp.followCA(ctx, secrets, name, path)
		}
		if err != nil && ctx.Err() == nil {
			cp.log.Error("keeping the CA and its secret one failed; retrying", "secret", k.CASecret, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// followCA takes the leader's CA from the Secret when it differs.
func (cp *ControlPlane) followCA(ctx context.Context, secrets typedcorev1.SecretInterface, name, path string) error {
	sec, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	data := sec.Data[ca.StateFile]
	local, _ := os.ReadFile(path)
	if len(data) == 0 || bytes.Equal(data, local) {
		return nil
	}
	if err := statefile.WriteAtomic(path, data, 0o600); err != nil {
		return err
	}
	if changed, err := cp.ca.Replaced(); err != nil {
		return err
	} else if changed {
		cp.log.Info("took the leader's CA from its secret", "secret", sec.Namespace+"/"+name)
	}
	return nil
}

// elect runs for the Lease until ctx ends, and reports whether this
// control plane leads.
func (cp *ControlPlane) elect(ctx context.Context, k *Kubernetes, leading *atomic.Bool, onLead func()) error {
	ns, name, _ := strings.Cut(k.CASecret, "/")
	id, err := os.Hostname()
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	id += "-" + strconv.Itoa(os.Getpid())
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: name, Namespace: ns},
		Client:     k.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: id},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock: lock, LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second,
			ReleaseOnCancel: true, Name: name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(context.Context) {
					leading.Store(true)
					onLead()
					cp.log.Info("leading: this control plane keeps the CA in its secret", "lease", ns+"/"+name, "id", id)
				},
				OnStoppedLeading: func() {
					leading.Store(false)
					cp.log.Info("no longer leading", "lease", ns+"/"+name, "id", id)
				},
			},
		})
		if err != nil {
			return fmt.Errorf("leader election: %w", err)
		}
		le.Run(ctx) // returns when leadership is lost: stand again
	}
	return nil
}

func writeSecret(ctx context.Context, secrets typedcorev1.SecretInterface, ns, name string, data []byte) error {
	cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/part-of": "trellis"}},
			Data:       map[string][]byte{ca.StateFile: data},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	if cur.Data == nil {
		cur.Data = map[string][]byte{}
	}
	cur.Data[ca.StateFile] = data
	_, err = secrets.Update(ctx, cur, metav1.UpdateOptions{})
	return err
}

// runKubernetes watches the cluster until ctx ends.
func (cp *ControlPlane) runKubernetes(ctx context.Context, k *Kubernetes, start func(func() error)) {
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.Client.CoreV1().Events("")})
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "trellis-control-plane"})
	start(func() error {
		<-ctx.Done()
		broadcaster.Shutdown()
		return nil
	})
	// Proxies wait until both the cluster's workloads and its resources
	// are in: a view computed before would lack the policies. Resources
	// are checked against the services, so they come second, and again
	// whenever the services' names change.
	// With several control planes, the leader alone writes statuses and
	// events (each would write the same, and the events N times).
	var leading atomic.Bool
	leading.Store(!k.LeaderElect)
	src := resources.New(resources.Config{Client: k.Dynamic, Events: recorder, Apply: cp.applyResources, Reporting: leading.Load, Log: cp.log.With("component", "resources")})
	synced := make(chan struct{})
	var serviceNames string
	start(func() error {
		return workloads.Watch(ctx, workloads.Config{
			Client:      k.Client,
			TrustDomain: cp.ca.TrustDomain(),
			OnChange: func(d registry.Declarations) {
				cp.registry.SetDeclarations(d)
				var names strings.Builder
				for _, svc := range d.Services {
					names.WriteString(svc.Namespace + "/" + svc.Name + "\n")
				}
				if n := names.String(); n != serviceNames {
					serviceNames = n
					src.Invalidate()
				}
			},
			Log: cp.log.With("component", "workloads"),
		}, synced)
	})
	start(func() error {
		select {
		case <-synced:
		case <-ctx.Done():
			return nil
		}
		return src.Run(ctx)
	})
	start(func() error {
		select {
		case <-synced:
		case <-ctx.Done():
			return nil
		}
		select {
		case <-cp.resourcesApplied:
		case <-ctx.Done():
			return nil
		}
		cp.log.Info("the cluster's workloads and resources are in: proxies may connect")
		cp.push.Release()
		return nil
	})
	start(func() error { return cp.publishBundle(ctx, k.Client) })
	if k.CASecret != "" {
		if k.LeaderElect {
			// A new leader reports what changed while it followed.
			start(func() error { return cp.elect(ctx, k, &leading, src.Invalidate) })
		}
		start(func() error { return cp.syncCA(ctx, k, leading.Load) })
	}
	if cp.webhookLis != nil {
		start(func() error { return cp.serveWebhook(ctx, k) })
		start(func() error { return cp.configureWebhook(ctx, k) })
	}
}

// Names the webhook's certificate is valid for: its Service's, and the
// address it listens on when that is an IP (the API server checks the
// name it calls).
var webhookDNSNames = []string{
	install.Name + "." + install.Namespace + ".svc",
	install.Name + "." + install.Namespace + ".svc.cluster.local",
}

// serveWebhook serves the sidecar injector until ctx ends, with a
// certificate from the mesh's CA, renewed as the CA's own are.
func (cp *ControlPlane) serveWebhook(ctx context.Context, k *Kubernetes) error {
	var ips []net.IP
	if ap, err := netip.ParseAddrPort(cp.webhookLis.Addr().String()); err == nil && !ap.Addr().IsUnspecified() {
		ips = append(ips, ap.Addr().AsSlice())
	}
	var (
		mu  sync.Mutex
		cur *tls.Certificate
	)
	getCert := func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if cur != nil && !ca.ShouldRotate(now, cur.Leaf.NotBefore, cur.Leaf.NotAfter) && cur.Leaf.CheckSignatureFrom(cp.ca.Issuer()) == nil {
			return cur, nil
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		chain, err := cp.ca.SignServing(key.Public(), meshid.ControlPlane(cp.ca.TrustDomain()), 0, webhookDNSNames, ips)
		if err != nil {
			if cur != nil && now.Before(cur.Leaf.NotAfter) {
				return cur, nil
			}
			return nil, err
		}
		c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
		for _, x := range chain {
			c.Certificate = append(c.Certificate, x.Raw)
		}
		cur = c
		return c, nil
	}
	namespaces := informers.NewSharedInformerFactory(k.Client, 0)
	lister := namespaces.Core().V1().Namespaces().Lister()
	namespaces.Start(ctx.Done())
	defer namespaces.Shutdown()
	injector := &webhook.Injector{
		Config: k.Inject,
		Namespaces: func(ctx context.Context, name string) (map[string]string, error) {
			ns, err := lister.Get(name)
			if apierrors.IsNotFound(err) {
				// A namespace created a moment ago may not have reached
				// the informer yet.
				ns, err = k.Client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
			}
			if err != nil {
				return nil, err
			}
			return ns.Labels, nil
		},
		Log: cp.log.With("component", "injector"),
	}
	mux := http.NewServeMux()
	mux.Handle(install.WebhookPath, injector)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert},
	}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	cp.log.Info("sidecar injector serving", "addr", "https://"+cp.webhookLis.Addr().String()+install.WebhookPath, "proxyImage", k.Inject.ProxyImage)
	if err := srv.ServeTLS(cp.webhookLis, "", ""); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("webhook: %w", err)
	}
	return nil
}

// configureWebhook keeps the injector's webhook configuration (which
// trellis install creates) trusting the mesh's CA, and pointing at
// WebhookURL when set; it follows the bundle as the CA rotates.
func (cp *ControlPlane) configureWebhook(ctx context.Context, k *Kubernetes) error {
	t := time.NewTicker(caCheckInterval)
	defer t.Stop()
	warned := false
	for {
		err := patchWebhook(ctx, k, certpem.EncodeCerts(cp.ca.Bundle()...))
		switch {
		case apierrors.IsNotFound(err) && !warned:
			cp.log.Warn("no webhook configuration "+install.WebhookName+" yet: pods are not injected until trellis install's manifests are applied", "err", err)
			warned = true
		case err != nil && !apierrors.IsNotFound(err) && ctx.Err() == nil:
			cp.log.Error("configuring the injector's webhook failed; retrying", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func patchWebhook(ctx context.Context, k *Kubernetes, bundle []byte) error {
	api := k.Client.AdmissionregistrationV1().MutatingWebhookConfigurations()
	cfg, err := api.Get(ctx, install.WebhookName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	changed := false
	for i := range cfg.Webhooks {
		cc := &cfg.Webhooks[i].ClientConfig
		if !bytes.Equal(cc.CABundle, bundle) {
			cc.CABundle, changed = bundle, true
		}
		if k.WebhookURL != "" && (cc.URL == nil || *cc.URL != k.WebhookURL || cc.Service != nil) {
			cc.URL, cc.Service, changed = &k.WebhookURL, nil, true
		}
	}
	if !changed {
		return nil
	}
	_, err = api.Update(ctx, cfg, metav1.UpdateOptions{})
	return err
}

// applyResources puts the cluster's valid resources in force, checked
// against the mesh as a directory's are.
func (cp *ControlPlane) applyResources(sources []policy.SourceFile) error {
	cp.reloadMu.Lock()
	defer cp.reloadMu.Unlock()
	set, err := policy.ParseSources(sources)
	if err == nil {
		err = cp.checkMesh(set)
	}
	if err != nil {
		cp.mu.Lock()
		cp.resources.Error = resourceErrors(err)
		cp.resources.RejectedAt = time.Now()
		cp.mu.Unlock()
		return err
	}
	cp.install(set, policy.Digest(sources)[:16])
	cp.appliedOnce.Do(func() { close(cp.resourcesApplied) })
	return nil
}

// publishBundle keeps the trust bundle in a ConfigMap of every namespace
// (inject.CAConfigMap), where injected proxies read it to verify the
// control plane before they have a certificate; it follows namespaces as
// they are created and the bundle as the CA rotates.
func (cp *ControlPlane) publishBundle(ctx context.Context, client kubernetes.Interface) error {
	t := time.NewTicker(caCheckInterval)
	defer t.Stop()
	// By namespace UID: a namespace deleted and made again under the same
	// name needs its ConfigMap again. Each is read again now and then, so
	// that one deleted or edited by hand comes back.
	type mark struct {
		bundle string
		at     time.Time
	}
	published := map[types.UID]mark{}
	// A new namespace gets its ConfigMap at once: its pods cannot start
	// without it.
	created := make(chan struct{}, 1)
	factory := informers.NewSharedInformerFactory(client, 0)
	if _, err := factory.Core().V1().Namespaces().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) {
			select {
			case created <- struct{}{}:
			default:
			}
		},
	}); err != nil {
		return fmt.Errorf("trust bundle: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	for {
		bundle := string(certpem.EncodeCerts(cp.ca.Bundle()...))
		nss, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		if err != nil && ctx.Err() == nil {
			cp.log.Error("listing namespaces to publish the trust bundle failed; retrying", "err", err)
		}
		if err == nil {
			now := time.Now()
			live := map[types.UID]bool{}
			for _, ns := range nss.Items {
				live[ns.UID] = true
				if m, ok := published[ns.UID]; (ok && m.bundle == bundle && now.Sub(m.at) < bundleRecheck) || ns.DeletionTimestamp != nil {
					continue
				}
				if err := writeBundle(ctx, client, ns.Name, bundle); err != nil {
					cp.log.Error("publishing the trust bundle failed; retrying", "namespace", ns.Name, "err", err)
					continue
				}
				published[ns.UID] = mark{bundle, now}
			}
			for uid := range published {
				if !live[uid] {
					delete(published, uid)
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-created:
		}
	}
}

// bundleRecheck is how often a published trust bundle ConfigMap is read
// again, in case someone deleted or edited it.
const bundleRecheck = 5 * time.Minute

func writeBundle(ctx context.Context, client kubernetes.Interface, namespace, bundle string) error {
	cms := client.CoreV1().ConfigMaps(namespace)
	want := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: inject.CAConfigMap, Namespace: namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "trellis"}},
		Data:       map[string]string{"root-cert.pem": bundle},
	}
	cur, err := cms.Get(ctx, inject.CAConfigMap, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, want, metav1.CreateOptions{})
		return err
	case err != nil:
		return err
	case cur.Data["root-cert.pem"] == bundle:
		return nil
	}
	cur.Data = want.Data
	_, err = cms.Update(ctx, cur, metav1.UpdateOptions{})
	return err
}
