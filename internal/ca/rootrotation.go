package ca

import (
	"errors"
	"fmt"
	"time"
)

// Root rotation happens in three steps, each a separate command, so that an
// operator can wait between them for every workload to pick up the new trust
// bundle (and later for every certificate under the old root to expire):
//
//  1. PrepareRoot adds a new root to the bundle; issuance is unchanged.
//  2. ActivateRoot issues from a new intermediate under the new root; the old
//     root stays in the bundle, so certificates issued before still verify.
//     It waits until every certificate issued before step 1 has expired:
//     each workload has then renewed at least once and received the new
//     bundle, without which it could not verify peers under the new root.
//  3. RetireRoot removes the old root from the bundle once no certificate
//     issued under it can still be valid.

// ErrRotationOrder is wrapped when a rotation step is run out of order.
var ErrRotationOrder = errors.New("root rotation step out of order")

// PrepareRoot adds a new root to the trust bundle without issuing from it.
// With certPEM and keyPEM empty, a root is generated.
func (c *CA) PrepareRoot(certPEM, keyPEM []byte, ttl time.Duration) error {
	if ttl == 0 {
		ttl = DefaultRootTTL
	}
	now := c.cfg.Now()
	var root parsedRoot
	var err error
	if len(certPEM) == 0 && len(keyPEM) == 0 {
		root.cert, root.key, err = newRoot(c.td, now, ttl)
	} else {
		root.cert, root.key, err = parseSuppliedCA("new root", certPEM, keyPEM, now)
		if err == nil && root.key == nil {
			err = errors.New("the new root's key is needed to sign its intermediate: pass --root-key")
		}
	}
	if err != nil {
		return fmt.Errorf("prepare root: %w", err)
	}
	root.status = rootPending
	err = c.mutate(func(p *parsedState) (bool, error) {
		// Every certificate issued until now carries the old bundle; they
		// are all expired by the active root's recorded bound.
		root.leavesValidUntil = p.activeRoot().leavesValidUntil
		if p.rootWithStatus(rootPending) != nil {
			return false, fmt.Errorf("%w: a new root is already prepared; run 'trellis ca rotate-root activate' next", ErrRotationOrder)
		}
		if p.rootWithStatus(rootRetiring) != nil {
			return false, fmt.Errorf("%w: the previous rotation is not finished; run 'trellis ca rotate-root retire' first", ErrRotationOrder)
		}
		p.roots = append(p.roots, root)
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("prepare root: %w", err)
	}
	c.cfg.Log.Info("new root added to the trust bundle", "root", fingerprint(root.cert))
	return nil
}

// ActivateRoot switches issuance to the prepared root through a new
// intermediate. The previous root stays trusted until RetireRoot. It
// refuses while a workload may still hold only the old bundle, unless
// force is set.
func (c *CA) ActivateRoot(force bool) error {
	now := c.cfg.Now()
	err := c.mutate(func(p *parsedState) (bool, error) {
		next := p.rootWithStatus(rootPending)
		if next == nil {
			return false, fmt.Errorf("%w: no prepared root; run 'trellis ca rotate-root prepare' first", ErrRotationOrder)
		}
		// Until then, leavesValidUntil of a pending root holds the time by
		// which every workload has the new bundle (set by PrepareRoot).
		if !force && now.Before(next.leavesValidUntil) {
			return false, fmt.Errorf("certificates issued before the new root was prepared may be valid until %s (%s from now), and their workloads do not trust the new root yet; wait until then, or pass --force to break those that have not renewed",
				next.leavesValidUntil.UTC().Format(time.RFC3339), next.leavesValidUntil.Sub(now).Round(time.Minute))
		}
		next.leavesValidUntil = time.Time{}
		cert, key, err := newIntermediate(c.td, next.cert, next.key, now, c.cfg.IntermediateTTL)
		if err != nil {
			return false, err
		}
		old := p.activeRoot()
		old.status = rootRetiring
		// Every certificate under the old root came from an intermediate it
		// signed, so none outlives the intermediate that issued last, nor the
		// bound recorded at each signature (zero: nothing was issued).
		if old.leavesValidUntil.After(p.issuer.cert.NotAfter) {
			old.leavesValidUntil = p.issuer.cert.NotAfter
		}
		next.status = rootActive
		p.issuer = parsedIssuer{cert: cert, key: key, root: next.cert}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("activate root: %w", err)
	}
	c.cfg.Log.Info("issuing from the new root", "intermediate", fingerprint(c.Issuer()))
	return nil
}

// RetireRoot removes the previous root from the trust bundle. It refuses
// while certificates issued under that root may still be valid, unless
// force is set.
func (c *CA) RetireRoot(force bool) error {
	now := c.cfg.Now()
	var retired parsedRoot
	err := c.mutate(func(p *parsedState) (bool, error) {
		for i, r := range p.roots {
			if r.status != rootRetiring {
				continue
			}
			if !force && now.Before(r.leavesValidUntil) {
				return false, fmt.Errorf("certificates issued under the old root may be valid until %s (%s from now); wait until every workload has renewed (they renew at about 70%% of their lifetime) or pass --force to break those that have not",
					r.leavesValidUntil.UTC().Format(time.RFC3339), r.leavesValidUntil.Sub(now).Round(time.Minute))
			}
			retired = r
			p.roots = append(p.roots[:i], p.roots[i+1:]...)
			return true, nil
		}
		return false, fmt.Errorf("%w: no root is being retired; run 'trellis ca rotate-root activate' first", ErrRotationOrder)
	})
	if err != nil {
		return fmt.Errorf("retire root: %w", err)
	}
	c.cfg.Log.Info("old root removed from the trust bundle", "root", fingerprint(retired.cert))
	return nil
}
