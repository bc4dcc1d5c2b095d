package match

import "strings"

// Set is the OR of several String patterns, compiled for matching many
// values against it: exact values are compared in a tight loop (or looked up
// in a map when there are many), then prefixes, then suffixes.
type Set struct {
	fold   bool
	any    bool // has "*"
	exact  []string
	index  map[string]struct{} // exact values, when there are many
	prefix []string
	suffix []string
}

// indexFrom is how many exact values make a map lookup cheaper than
// comparing each.
const indexFrom = 16

// NewSet compiles patterns; fold makes matching ASCII case-insensitive.
func NewSet(patterns []string, fold bool) (Set, error) {
	s := Set{fold: fold}
	for _, p := range patterns {
		m, err := parse(p, fold)
		if err != nil {
			return Set{}, err
		}
		v := m.value
		if fold {
			v = toLowerASCII(v)
		}
		switch m.kind {
		case Presence:
			s.any = true
		case Exact:
			s.exact = append(s.exact, v)
		case Prefix:
			s.prefix = append(s.prefix, v)
		case Suffix:
			s.suffix = append(s.suffix, v)
		}
	}
	if !fold && len(s.exact) >= indexFrom {
		s.index = make(map[string]struct{}, len(s.exact))
		for _, e := range s.exact {
			s.index[e] = struct{}{}
		}
	}
	return s, nil
}

// Match reports whether v matches any pattern; an empty v matches none.
func (s *Set) Match(v string) bool {
	if v == "" {
		return false
	}
	if s.any {
		return true
	}
	if s.fold {
		return s.matchFold(v)
	}
	if s.index != nil {
		if _, ok := s.index[v]; ok {
			return true
		}
	} else {
		for _, e := range s.exact {
			if v == e {
				return true
			}
		}
	}
	for _, p := range s.prefix {
		if strings.HasPrefix(v, p) {
			return true
		}
	}
	for _, p := range s.suffix {
		if strings.HasSuffix(v, p) {
			return true
		}
	}
	return false
}

func (s *Set) matchFold(v string) bool {
	for _, e := range s.exact {
		if equalFoldASCII(v, e) {
			return true
		}
	}
	for _, p := range s.prefix {
		if len(v) >= len(p) && equalFoldASCII(v[:len(p)], p) {
			return true
		}
	}
	for _, p := range s.suffix {
		if len(v) >= len(p) && equalFoldASCII(v[len(v)-len(p):], p) {
			return true
		}
	}
	return false
}

// Exact returns the exact values when the set has nothing but exact values
// and compares case-sensitively, for callers that index on them.
func (s *Set) Exact() ([]string, bool) {
	if s.fold || s.any || len(s.prefix) > 0 || len(s.suffix) > 0 || len(s.exact) == 0 {
		return nil, false
	}
	return s.exact, true
}
