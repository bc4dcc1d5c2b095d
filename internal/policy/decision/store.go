package decision

import (
	"fmt"
	"sync/atomic"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// Store holds the policies in force for components that watch a directory.
// A reload builds and compiles the whole new set before swapping it in; if
// anything is wrong the previous set stays in force, so a bad edit never
// half-applies and never removes protection.
type Store struct {
	root string
	cur  atomic.Pointer[Mesh]
}

// NewStore returns an empty store for the given root namespace; Current is
// nil until the first successful Reload.
func NewStore(root string) *Store { return &Store{root: root} }

// Current returns the policies in force, or nil before the first load.
func (s *Store) Current() *Mesh { return s.cur.Load() }

// Reload loads dir and swaps it in, or returns why not and keeps the
// previous policies.
func (s *Store) Reload(dir string) error {
	set, err := policy.LoadDir(dir)
	if err != nil {
		return fmt.Errorf("reload policies from %s (previous policies stay in force): %w", dir, err)
	}
	m, err := Compile(set, s.root)
	if err != nil {
		return fmt.Errorf("reload policies from %s (previous policies stay in force): %w", dir, err)
	}
	s.cur.Store(m)
	return nil
}
