// Package match implements the value matching of authorization policies as
// Istio documents it ("AuthorizationPolicy" reference, "Value matching"):
// exact ("abc"), prefix ("abc*"), suffix ("*abc") and presence ("*", any
// non-empty value), plus the path templates "{*}" and "{**}" that only paths
// accept. Patterns are parsed once, when policies are loaded, so that a
// malformed pattern is a configuration error rather than a silent non-match,
// and matching a request never allocates.
package match

import (
	"errors"
	"strings"
)

// Kind is how a String pattern compares a value.
type Kind uint8

// The pattern kinds of Istio's value matching.
const (
	Exact    Kind = iota // "abc" matches "abc" only
	Prefix               // "abc*" matches "abc" and "abcd"
	Suffix               // "*abc" matches "abc" and "xabc"
	Presence             // "*" matches any non-empty value
)

// String is a parsed exact, prefix, suffix or presence pattern.
type String struct {
	kind    Kind
	fold    bool   // compare ASCII case-insensitively (hosts)
	value   string // the pattern without its '*'
	pattern string // as written, for explanations
}

// Errors returned by ParseString and ParsePath. Callers add the field name.
var (
	ErrEmpty         = errors.New(`empty value; write "*" to match any non-empty value`)
	ErrInnerWildcard = errors.New(`'*' may only be the whole value ("*"), its first character ("*abc") or its last character ("abc*")`)
)

// ParseString parses a case-sensitive pattern.
func ParseString(pattern string) (String, error) {
	return parse(pattern, false)
}

// ParseFold parses a pattern compared case-insensitively for ASCII letters,
// as Istio compares hosts ("Operation" reference: "The match is
// case-insensitive").
func ParseFold(pattern string) (String, error) {
	return parse(pattern, true)
}

func parse(pattern string, fold bool) (String, error) {
	s := String{fold: fold, pattern: pattern}
	switch n := strings.Count(pattern, "*"); {
	case pattern == "":
		return String{}, ErrEmpty
	case pattern == "*":
		s.kind = Presence
	case n == 0:
		s.kind, s.value = Exact, pattern
	case n == 1 && pattern[0] == '*':
		s.kind, s.value = Suffix, pattern[1:]
	case n == 1 && pattern[len(pattern)-1] == '*':
		s.kind, s.value = Prefix, pattern[:len(pattern)-1]
	default:
		return String{}, ErrInnerWildcard
	}
	return s, nil
}

// String returns the pattern as written.
func (s String) String() string { return s.pattern }

// Match reports whether v matches. An empty v is an absent value: only
// patterns that need no characters could match it, and Istio's presence
// match explicitly requires a non-empty value, so nothing matches "".
func (s String) Match(v string) bool {
	if v == "" {
		return false
	}
	switch s.kind {
	case Presence:
		return true
	case Exact:
		return s.equal(v, s.value)
	case Prefix:
		return len(v) >= len(s.value) && s.equal(v[:len(s.value)], s.value)
	case Suffix:
		return len(v) >= len(s.value) && s.equal(v[len(v)-len(s.value):], s.value)
	}
	return false
}

func (s String) equal(a, b string) bool {
	if s.fold {
		return equalFoldASCII(a, b)
	}
	return a == b
}

// equalFoldASCII compares ignoring the case of ASCII letters only. Hosts
// are ASCII (internationalized names travel as punycode), and Unicode case
// folding would make distinct byte strings equal, such as the Kelvin sign
// and "k".
func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if lowerASCII(a[i]) != lowerASCII(b[i]) {
			return false
		}
	}
	return true
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// toLowerASCII lowers ASCII letters only, leaving other bytes as they are.
func toLowerASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		b[i] = lowerASCII(c)
	}
	return string(b)
}
