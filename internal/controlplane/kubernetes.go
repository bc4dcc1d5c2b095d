package controlplane

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/trellis-mesh/trellis/internal/certpem"
	"github.com/trellis-mesh/trellis/internal/identityservice"
	"github.com/trellis-mesh/trellis/internal/k8s/inject"
	"github.com/trellis-mesh/trellis/internal/k8s/resources"
	"github.com/trellis-mesh/trellis/internal/k8s/workloads"
	"github.com/trellis-mesh/trellis/internal/policy"
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
	start(func() error {
		return workloads.Watch(ctx, workloads.Config{Client: k.Client, OnChange: cp.registry.SetDeclarations, Log: cp.log.With("component", "workloads")}, nil)
	})
	start(func() error {
		src := resources.New(resources.Config{Client: k.Dynamic, Events: recorder, Apply: cp.applyResources, Log: cp.log.With("component", "resources")})
		return src.Run(ctx)
	})
	start(func() error { return cp.publishBundle(ctx, k.Client) })
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
	h := sha256.New()
	for _, s := range sources {
		fmt.Fprintf(h, "%s\x00%d\x00", s.Name, len(s.Data))
		h.Write(s.Data)
	}
	cp.install(set, hex.EncodeToString(h.Sum(nil))[:16])
	return nil
}

// publishBundle keeps the trust bundle in a ConfigMap of every namespace
// (inject.CAConfigMap), where injected proxies read it to verify the
// control plane before they have a certificate; it follows namespaces as
// they are created and the bundle as the CA rotates.
func (cp *ControlPlane) publishBundle(ctx context.Context, client kubernetes.Interface) error {
	t := time.NewTicker(caCheckInterval)
	defer t.Stop()
	published := map[string]string{} // namespace → bundle written
	for {
		bundle := string(certpem.EncodeCerts(cp.ca.Bundle()...))
		nss, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		if err != nil && ctx.Err() == nil {
			cp.log.Error("listing namespaces to publish the trust bundle failed; retrying", "err", err)
		}
		if err == nil {
			for _, ns := range nss.Items {
				if published[ns.Name] == bundle || ns.DeletionTimestamp != nil {
					continue
				}
				if err := writeBundle(ctx, client, ns.Name, bundle); err != nil {
					cp.log.Error("publishing the trust bundle failed; retrying", "namespace", ns.Name, "err", err)
					continue
				}
				published[ns.Name] = bundle
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

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
