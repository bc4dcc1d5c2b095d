// Package resources watches Trellis' custom resources in a Kubernetes
// cluster and hands the control plane the valid ones, as the resource
// directory does on one machine: the same loader (internal/policy) reads
// both, so a resource means the same thing in a file and in a cluster.
//
// In a cluster each resource stands alone: an invalid one does not hold
// back the others. It is reported where its author looks — its status
// (condition Accepted False, naming the field and the fix) and a Warning
// event — and the previous valid version of it, if any, stays in force,
// so that a typo in a DENY policy does not lift the denial.
package resources

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// Kind is one watched resource type.
type Kind struct {
	Kind string
	GVR  schema.GroupVersionResource
}

// Kinds are the resources the control plane reads from the cluster.
var Kinds = []Kind{
	{policy.KindPeerAuthentication, schema.GroupVersionResource{Group: policy.Group, Version: "v1", Resource: "peerauthentications"}},
	{policy.KindAuthorizationPolicy, schema.GroupVersionResource{Group: policy.Group, Version: "v1", Resource: "authorizationpolicies"}},
	{policy.KindServiceEntry, schema.GroupVersionResource{Group: policy.NetworkingGroup, Version: "v1", Resource: "serviceentries"}},
	{policy.KindDestinationRule, schema.GroupVersionResource{Group: policy.NetworkingGroup, Version: "v1", Resource: "destinationrules"}},
	{policy.KindVirtualService, schema.GroupVersionResource{Group: policy.NetworkingGroup, Version: "v1", Resource: "virtualservices"}},
}

// ConditionAccepted is the status condition the control plane sets.
const ConditionAccepted = "Accepted"

// Reasons of the Accepted condition.
const (
	ReasonAccepted = "Accepted"
	// ReasonInvalid: the resource alone is invalid.
	ReasonInvalid = "Invalid"
	// ReasonConflict: the resource is valid alone but not with the
	// others (two ServiceEntries for one host, say).
	ReasonConflict = "Conflict"
)

// Config configures a Source.
type Config struct {
	Client dynamic.Interface
	// Events records a Warning event on each rejected resource; nil
	// records none.
	Events record.EventRecorder
	// Apply puts the valid resources in force, all of them each time; an
	// error of type policy.Errors names the resources at fault (File is
	// the name SourceName gives), which are then reported as conflicting.
	Apply func(sources []policy.SourceFile) error
	Log   *slog.Logger
	// Reporting, when set, says whether this control plane writes the
	// statuses and events (several replicas: the leader alone); nil: it
	// does.
	Reporting func() bool
	// SyncTimeout bounds the first listing: a CRD that is not installed
	// is reported rather than waited for forever (default 30 s).
	SyncTimeout time.Duration
	// Now is the clock of condition timestamps (default time.Now).
	Now func() time.Time
}

// Source watches the resources.
type Source struct {
	cfg     Config
	wake    chan struct{}
	listers map[string]cache.GenericLister // by Kind

	mu sync.Mutex
	// accepted is the last valid version of each resource, by key.
	accepted    map[string]policy.SourceFile
	lastApplied string
}

// New returns a Source; Run watches.
func New(cfg Config) *Source {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.SyncTimeout == 0 {
		cfg.SyncTimeout = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Source{cfg: cfg, wake: make(chan struct{}, 1), listers: map[string]cache.GenericLister{}, accepted: map[string]policy.SourceFile{}}
}

// SourceName is the name a resource's problems are reported under (the
// "file" of policy errors).
func SourceName(kind, namespace, name string) string {
	return "kubernetes:" + kind + "/" + namespace + "/" + name
}

// Run lists and watches the resources until ctx ends, applying them after
// the first listing and after every change (changes arriving together are
// applied once).
func (s *Source) Run(ctx context.Context) error {
	factory := dynamicinformer.NewDynamicSharedInformerFactory(s.cfg.Client, 0)
	synced := map[string]cache.InformerSynced{}
	for _, k := range Kinds {
		inf := factory.ForResource(k.GVR)
		if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { s.poke() },
			UpdateFunc: func(any, any) { s.poke() },
			DeleteFunc: func(any) { s.poke() },
		}); err != nil {
			return fmt.Errorf("resources: watch %s: %w", k.GVR.Resource, err)
		}
		s.listers[k.Kind] = inf.Lister()
		synced[k.Kind] = inf.Informer().HasSynced
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()

	// A CRD that is not installed (yet) is reported, and waited for: the
	// control plane keeps serving what it has meanwhile.
	for kind, ok := range synced {
		for {
			syncCtx, cancel := context.WithTimeout(ctx, s.cfg.SyncTimeout)
			done := cache.WaitForCacheSync(syncCtx.Done(), ok)
			cancel()
			if done {
				break
			}
			if ctx.Err() != nil {
				return nil
			}
			s.cfg.Log.Error("cannot list a resource kind: is its CRD installed (trellis install) and may the control plane read it? Still trying", "kind", kind, "after", s.cfg.SyncTimeout)
		}
	}
	s.cfg.Log.Info("watching resources", "kinds", len(Kinds))
	s.Sync(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.wake:
		}
		// Let a burst (kubectl apply -f dir/) arrive before applying.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
		s.Sync(ctx)
	}
}

func (s *Source) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// object is one listed resource.
type object struct {
	kind Kind
	u    *unstructured.Unstructured
	key  string
}

// Invalidate makes the next sync apply the resources even if none
// changed: what they are checked against (the mesh's services) did.
func (s *Source) Invalidate() {
	s.mu.Lock()
	s.lastApplied = ""
	s.mu.Unlock()
	s.poke()
}

// Sync reads every resource from the informers' caches, checks each,
// applies the valid ones and reports on each in its status.
func (s *Source) Sync(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	before := maps.Clone(s.accepted)
	var objs []object
	for _, k := range Kinds {
		list, err := s.listers[k.Kind].List(labels.Everything())
		if err != nil {
			s.cfg.Log.Error("listing resources failed", "kind", k.Kind, "err", err)
			return
		}
		for _, o := range list {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			objs = append(objs, object{kind: k, u: u, key: SourceName(k.Kind, u.GetNamespace(), u.GetName())})
		}
	}
	slices.SortFunc(objs, func(a, b object) int { return strings.Compare(a.key, b.key) })

	type verdict struct {
		reason, message string
	}
	verdicts := map[string]verdict{}
	present := map[string]bool{}
	for _, o := range objs {
		present[o.key] = true
		src, err := sourceOf(o)
		if err == nil {
			_, err = policy.ParseSources([]policy.SourceFile{src})
		}
		if err != nil {
			msg := describe(err)
			if _, ok := s.accepted[o.key]; ok {
				msg += "; the previous version stays in force"
			} else {
				msg += "; not in force"
			}
			verdicts[o.key] = verdict{ReasonInvalid, msg}
			continue
		}
		s.accepted[o.key] = src
	}
	for key := range s.accepted {
		if !present[key] {
			delete(s.accepted, key)
		}
	}

	// A conflict names the resources at fault: they go back to their
	// previous version (or out, if new) and the rest is applied, so that
	// one bad resource cannot hold back every other change.
	for attempt := 0; ; attempt++ {
		sources := slices.SortedFunc(maps.Values(s.accepted), func(a, b policy.SourceFile) int { return strings.Compare(a.Name, b.Name) })
		digest := policy.Digest(sources)
		if digest == s.lastApplied {
			break
		}
		err := s.cfg.Apply(sources)
		if err == nil {
			s.lastApplied = digest
			s.cfg.Log.Info("resources applied", "count", len(sources), "version", digest[:16])
			break
		}
		var perrs policy.Errors
		if !errors.As(err, &perrs) || attempt == 2 {
			s.cfg.Log.Error("applying resources failed; the previous ones stay in force", "err", err)
			for key := range s.accepted {
				if _, ok := verdicts[key]; !ok && !equalSource(before[key], s.accepted[key]) {
					verdicts[key] = verdict{ReasonConflict, "not applied: " + describe(err)}
				}
			}
			break
		}
		byFile := map[string][]string{}
		for _, e := range perrs {
			byFile[e.File] = append(byFile[e.File], fieldMessage(e))
		}
		reverted := false
		for key, msgs := range byFile {
			prev, had := before[key]
			cur, ok := s.accepted[key]
			if !ok {
				continue
			}
			msg := strings.Join(msgs, "; ")
			switch {
			case had && !equalSource(prev, cur):
				s.accepted[key] = prev
				msg += "; the previous version stays in force"
				reverted = true
			case !had:
				delete(s.accepted, key)
				msg += "; not in force"
				reverted = true
			default:
				// Already in force: the newer side of the conflict is
				// the one to refuse (below), not this one.
				continue
			}
			if _, ok := verdicts[key]; !ok {
				verdicts[key] = verdict{ReasonConflict, msg}
			}
		}
		s.cfg.Log.Error("resources in conflict; applying the others", "err", err)
		if !reverted {
			// The resources at fault were already in force: what changed
			// against them is what must wait.
			for key, cur := range s.accepted {
				if prev, had := before[key]; !had {
					delete(s.accepted, key)
				} else if !equalSource(prev, cur) {
					s.accepted[key] = prev
				} else {
					continue
				}
				if _, ok := verdicts[key]; !ok {
					verdicts[key] = verdict{ReasonConflict, "not applied: " + describe(err)}
				}
			}
		}
	}

	for _, o := range objs {
		v, bad := verdicts[o.key]
		cond := metav1.Condition{Type: ConditionAccepted, Status: metav1.ConditionTrue, Reason: ReasonAccepted, Message: "in force", ObservedGeneration: o.u.GetGeneration()}
		if bad {
			cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, v.reason, v.message
		}
		s.report(ctx, o, cond)
	}
}

// sourceOf is a resource as the loader reads it: its YAML without status
// and server-side bookkeeping.
func sourceOf(o object) (policy.SourceFile, error) {
	m := runtime.DeepCopyJSON(o.u.Object)
	delete(m, "status")
	if meta, ok := m["metadata"].(map[string]any); ok {
		delete(meta, "managedFields")
		if ann, ok := meta["annotations"].(map[string]any); ok {
			// kubectl's copy of the whole object, a second spec.
			delete(ann, corev1.LastAppliedConfigAnnotation)
			if len(ann) == 0 {
				delete(meta, "annotations")
			}
		}
	}
	data, err := yaml.Marshal(m)
	if err != nil {
		return policy.SourceFile{}, err
	}
	return policy.SourceFile{Name: o.key, Data: data}, nil
}

// describe turns the loader's errors into a status message: the fields
// and what to do, without the source name the status already belongs to.
func describe(err error) string {
	var perrs policy.Errors
	if !errors.As(err, &perrs) {
		return err.Error()
	}
	msgs := make([]string, 0, len(perrs))
	for _, e := range perrs {
		msgs = append(msgs, fieldMessage(e))
	}
	return strings.Join(msgs, "; ")
}

func fieldMessage(e *policy.Error) string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

func equalSource(a, b policy.SourceFile) bool {
	return a.Name == b.Name && string(a.Data) == string(b.Data)
}

// report writes the condition into the resource's status when it
// changed, and records an event when the resource is newly rejected.
func (s *Source) report(ctx context.Context, o object, cond metav1.Condition) {
	if s.cfg.Reporting != nil && !s.cfg.Reporting() {
		return
	}
	old := currentCondition(o.u)
	if old != nil && old.Status == cond.Status && old.Reason == cond.Reason && old.Message == cond.Message && old.ObservedGeneration == cond.ObservedGeneration {
		return
	}
	cond.LastTransitionTime = metav1.NewTime(s.cfg.Now())
	if old != nil && old.Status == cond.Status {
		cond.LastTransitionTime = old.LastTransitionTime
	}
	u := o.u.DeepCopy()
	condMap, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&cond)
	if err != nil {
		return
	}
	status, _ := u.Object["status"].(map[string]any)
	if status == nil {
		status = map[string]any{}
	}
	status["observedGeneration"] = o.u.GetGeneration()
	status["conditions"] = []any{condMap}
	u.Object["status"] = status
	_, err = s.cfg.Client.Resource(o.kind.GVR).Namespace(u.GetNamespace()).UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if err != nil {
		// A newer version arrived meanwhile; its own sync reports on it.
		s.cfg.Log.Debug("status update failed", "resource", o.key, "err", err)
	}
	if cond.Status == metav1.ConditionFalse && s.cfg.Events != nil {
		s.cfg.Events.Event(o.u, corev1.EventTypeWarning, "Rejected", cond.Message)
	}
	if cond.Status == metav1.ConditionFalse {
		s.cfg.Log.Warn("resource rejected", "resource", o.kind.Kind+" "+o.u.GetNamespace()+"/"+o.u.GetName(), "reason", cond.Reason, "problem", cond.Message)
	}
}

func currentCondition(u *unstructured.Unstructured) *metav1.Condition {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if !ok || m["type"] != ConditionAccepted {
			continue
		}
		var cond metav1.Condition
		if runtime.DefaultUnstructuredConverter.FromUnstructured(m, &cond) == nil {
			return &cond
		}
	}
	return nil
}
