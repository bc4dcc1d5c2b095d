package proxy

import (
	"context"
	"io/fs"
	"os"
	"time"

	"github.com/trellis-mesh/trellis/internal/dirwatch"
	"github.com/trellis-mesh/trellis/internal/meshid"
	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/policy/authz"
	"github.com/trellis-mesh/trellis/internal/policy/mtls"
)

// policyState is what the hot path consults: the mTLS mode of each port and
// the compiled authorization for this workload. It is replaced whole.
type policyState struct {
	ports   mtls.Ports
	authz   *authz.Evaluator
	version string
}

// compilePolicies turns a validated policy set into the proxy's state for wl.
func compilePolicies(set *policy.Set, wl policy.Workload, version string) (*policyState, error) {
	idx, err := authz.Compile(set.AuthorizationPolicies, meshid.RootNamespace)
	if err != nil {
		return nil, err
	}
	return &policyState{
		ports:   mtls.ForWorkload(set.PeerAuthentications, meshid.RootNamespace, wl),
		authz:   idx.ForWorkload(wl),
		version: version,
	}, nil
}

// AwaitingVersion is the policy version of a proxy that waits for its
// first update (Options.AwaitUpdate).
const AwaitingVersion = "awaiting-control-plane"

// awaitingPolicies admits nothing: mesh-wide STRICT, and an ALLOW policy
// without rules, which denies every request with its name as the reason.
func awaitingPolicies() *policy.Set {
	meta := policy.Metadata{Name: AwaitingVersion, Namespace: meshid.RootNamespace}
	return &policy.Set{
		PeerAuthentications: []*policy.PeerAuthentication{{APIVersion: policy.APIVersion, Metadata: meta,
			Spec: policy.PeerAuthenticationSpec{MTLS: &policy.MTLS{Mode: policy.ModeStrict}}}},
		AuthorizationPolicies: []*policy.AuthorizationPolicy{{APIVersion: policy.APIVersion, Metadata: meta,
			Spec: policy.AuthorizationPolicySpec{Action: policy.ActionAllow}}},
	}
}

// loadPolicyDir loads and compiles a policy directory; with dir empty the
// state is the mesh without policy: PERMISSIVE, everything allowed.
func loadPolicyDir(dir string, wl policy.Workload) (*policyState, error) {
	set := &policy.Set{}
	version := "none"
	if dir != "" {
		var err error
		if set, err = policy.LoadDir(dir); err != nil {
			return nil, err
		}
		version = dirwatch.Stamp(dir)
	}
	return compilePolicies(set, wl, version)
}

// watchPolicies reloads the policy directory when it changes. An invalid
// change is logged and the previous policies stay in force: a bad edit never
// removes protection.
func (p *Proxy) watchPolicies(ctx context.Context, dir string, every time.Duration) error {
	return dirwatch.Watch(ctx, dirwatch.Config{
		Dir: dir, Poll: every, Since: p.policies.Load().version, Log: p.log,
		OnChange: func() {
			st, err := loadPolicyDir(dir, p.workload)
			if err != nil {
				p.log.Error("policy change rejected; the previous policies stay in force", "dir", dir, "err", err)
				return
			}
			p.policies.Store(st)
			p.closeInadmissible(st)
			p.log.Info("policies reloaded", "dir", dir)
		},
	})
}

// policyDirExists is used to fail early on a typo in --config's policies.
func policyDirExists(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return &fs.PathError{Op: "open", Path: dir, Err: fs.ErrInvalid}
	}
	return nil
}
