package match

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// Cases follow the "Value matching" section of Istio's AuthorizationPolicy
// reference: exact, prefix, suffix and presence.
func TestString(t *testing.T) {
	tests := []struct {
		pattern string
		fold    bool
		value   string
		want    bool
	}{
		{"abc", false, "abc", true},
		{"abc", false, "abcd", false},
		{"abc", false, "ABC", false},
		{"abc*", false, "abc", true},
		{"abc*", false, "abcd", true},
		{"abc*", false, "xabc", false},
		{"*abc", false, "abc", true},
		{"*abc", false, "xabc", true},
		{"*abc", false, "abcx", false},
		{"*", false, "x", true},
		{"*", false, "", false}, // presence needs a non-empty value
		{"abc*", false, "", false},
		{"*.example.com", true, "API.Example.COM", true}, // hosts are case-insensitive
		{"Example.com", true, "example.COM", true},
		{"example.*", true, "EXAMPLE.org", true},
		{"example.com", true, "example.org", false},
		{"k.example.com", true, "\u212a.example.com", false}, // the Kelvin sign is not "k"
	}
	for _, tt := range tests {
		parse := ParseString
		if tt.fold {
			parse = ParseFold
		}
		m, err := parse(tt.pattern)
		if err != nil {
			t.Fatalf("parse(%q): %v", tt.pattern, err)
		}
		if got := m.Match(tt.value); got != tt.want {
			t.Errorf("%q.Match(%q) = %v, want %v", tt.pattern, tt.value, got, tt.want)
		}
		if m.String() != tt.pattern {
			t.Errorf("String() = %q, want %q", m.String(), tt.pattern)
		}
	}
}

func TestParseStringErrors(t *testing.T) {
	for pattern, want := range map[string]error{
		"":      ErrEmpty,
		"**":    ErrInnerWildcard,
		"a*b":   ErrInnerWildcard,
		"*a*":   ErrInnerWildcard,
		"a**":   ErrInnerWildcard,
		"*/a/*": ErrInnerWildcard,
	} {
		if _, err := ParseString(pattern); !errors.Is(err, want) {
			t.Errorf("ParseString(%q) = %v, want %v", pattern, err, want)
		}
	}
}

// Path templates per the "Operation" paths documentation of Istio's
// AuthorizationPolicy reference.
func TestPath(t *testing.T) {
	tests := []struct {
		pattern string
		path    string
		want    bool
	}{
		{"/v1/orders", "/v1/orders", true},
		{"/v1/orders", "/v1/orders/", false},
		{"/v1/*", "/v1/orders/1", true},
		{"*.html", "/a/b.html", true},
		{"*", "/", true},
		{"/foo/{*}", "/foo/bar", true},
		{"/foo/{*}", "/foo/bar/baz", false},
		{"/foo/{*}", "/foo/", false},
		{"/foo/{*}/baz", "/foo/bar/baz", true},
		{"/foo/{*}/baz", "/foo/bar/qux", false},
		{"/foo/{**}", "/foo/bar", true},
		{"/foo/{**}", "/foo/bar/baz/qux", true},
		{"/foo/{**}", "/foo", false},
		{"/foo/{**}", "/foo/", true},
		{"/foo/{**}/", "/foo/bar/", true},
		{"/foo/{**}/", "/foo/bar/baz.txt/", true},
		{"/foo/{**}/", "/foo/bar", false},
		{"/foo/{**}/bar", "/foo/a/b/bar", true},
		{"/foo/{**}/bar", "/foo/a/b/baz", false},
		{"/{*}/bar/{**}", "/x/bar/y/z", true},
		{"/{*}/bar/{**}", "/x/y/bar/z", false},
		{"/{**}", "/anything/at/all", true},
		{"/foo/{*}", "/foo/b?r", false}, // '?' is not a path character
	}
	for _, tt := range tests {
		p, err := ParsePath(tt.pattern)
		if err != nil {
			t.Fatalf("ParsePath(%q): %v", tt.pattern, err)
		}
		if got := p.Match(tt.path); got != tt.want {
			t.Errorf("%q.Match(%q) = %v, want %v", tt.pattern, tt.path, got, tt.want)
		}
	}
}

func TestParsePathErrors(t *testing.T) {
	for pattern, want := range map[string]error{
		"":                ErrEmpty,
		"v1/orders":       ErrPathStart,
		"{*}/a":           ErrPathStart,
		"/a*b":            ErrInnerWildcard,
		"/foo/{**}/{*}":   ErrAnyNotLast,
		"/foo/{**}/{**}":  ErrAnyNotLast,
		"/foo{*}/":        ErrBraces,
		"/foo/{***}":      ErrBraces,
		"/foo/}":          ErrBraces,
		"/foo/{*}/bar*":   ErrTemplateStar,
		"/foo/{*}/b r":    ErrTemplateChars,
		"/foo/{*}/a\x00b": ErrTemplateChars,
	} {
		if _, err := ParsePath(pattern); !errors.Is(err, want) {
			t.Errorf("ParsePath(%q) = %v, want %v", pattern, err, want)
		}
	}
}

func TestCleanPath(t *testing.T) {
	for in, want := range map[string]string{
		"/v1/orders":          "/v1/orders",
		"/v1/orders?id=1":     "/v1/orders",
		"/v1/orders#x":        "/v1/orders",
		"/public/../admin":    "/admin",
		"/a/./b":              "/a/b",
		"/a/b/..":             "/a/",
		"/..":                 "/",
		"/a/..b/c":            "/a/..b/c",
		"//a//b":              "//a//b",
		"/a/b/../../../c":     "/c",
		"/a/%2e%2e/b":         "/a/%2e%2e/b",
		"/x/.?q=/../admin":    "/x/",
		"/a/b/./../c/./d/../": "/a/c/",
	} {
		if got := CleanPath(in); got != want {
			t.Errorf("CleanPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSetIndexesManyExactValues(t *testing.T) {
	var vals []string
	for i := range 40 {
		vals = append(vals, fmt.Sprintf("cluster.local/ns/ns%d/sa/app", i))
	}
	s, err := NewSet(append(vals, "*/sa/admin", "spiffe-*"), false)
	if err != nil {
		t.Fatal(err)
	}
	if s.index == nil {
		t.Fatal("no index for 40 exact values")
	}
	for v, want := range map[string]bool{
		"cluster.local/ns/ns7/sa/app": true, "cluster.local/ns/ns40/sa/app": false,
		"x/sa/admin": true, "spiffe-x": true, "": false,
	} {
		if got := s.Match(v); got != want {
			t.Errorf("Match(%q) = %v, want %v", v, got, want)
		}
	}
	if _, ok := s.Exact(); ok {
		t.Error("Exact() reports a set with prefixes as exact-only")
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	s, _ := ParseFold("*.example.com")
	p, _ := ParsePath("/api/{*}/items/{**}")
	set, _ := NewSet([]string{"a.example.com", "*.example.org", "API.*"}, true)
	var ok bool
	allocs := testing.AllocsPerRun(100, func() {
		ok = s.Match("api.EXAMPLE.com") && p.Match("/api/v1/items/a/b") &&
			CleanPath("/api/v1/items?x=1") == "/api/v1/items" && set.Match("api.example.net")
	})
	if !ok {
		t.Error("a pattern did not match")
	}
	if allocs != 0 {
		t.Errorf("matching allocated %v times", allocs)
	}
}

// reference returns a regular expression with the documented meaning of a
// pattern, to check the hand-written matchers against.
func reference(pattern string, path bool) *regexp.Regexp {
	const pchar = `[A-Za-z0-9\-._~%!$&'()*+,;=:@]`
	if path && strings.ContainsAny(pattern, "{}") {
		var b strings.Builder
		b.WriteString("^")
		for i, seg := range strings.Split(pattern, "/") {
			if i > 0 {
				b.WriteString("/")
			}
			switch seg {
			case "{*}":
				b.WriteString(pchar + "+")
			case "{**}":
				b.WriteString(`(` + pchar + `|/)*`)
			default:
				b.WriteString(regexp.QuoteMeta(seg))
			}
		}
		b.WriteString("$")
		return regexp.MustCompile(b.String())
	}
	switch {
	case pattern == "*":
		return regexp.MustCompile(`^(?s).+$`)
	case strings.HasPrefix(pattern, "*"):
		return regexp.MustCompile(`^(?s).*` + regexp.QuoteMeta(pattern[1:]) + `$`)
	case strings.HasSuffix(pattern, "*"):
		return regexp.MustCompile(`^(?s)` + regexp.QuoteMeta(pattern[:len(pattern)-1]) + `.*$`)
	}
	return regexp.MustCompile(`^` + regexp.QuoteMeta(pattern) + `$`)
}

func FuzzString(f *testing.F) {
	for _, s := range [][2]string{{"abc", "abc"}, {"abc*", "abcd"}, {"*abc", "xabc"}, {"*", ""}, {"a*b", "ab"}, {"", "x"}, {"*", "*"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, value string) {
		m, err := ParseString(pattern)
		if err != nil {
			return
		}
		got := m.Match(value)
		// A Set of one pattern agrees with the pattern, with and without
		// case folding; a Set of several matches when any of them does.
		set, err := NewSet([]string{pattern}, false)
		if err != nil || set.Match(value) != got {
			t.Fatalf("Set{%q}.Match(%q) = %v, %v; String says %v", pattern, value, set.Match(value), err, got)
		}
		fm, _ := ParseFold(pattern)
		fset, _ := NewSet([]string{pattern}, true)
		if fset.Match(value) != fm.Match(value) {
			t.Fatalf("folded Set{%q}.Match(%q) = %v; String says %v", pattern, value, fset.Match(value), fm.Match(value))
		}
		two, _ := NewSet([]string{pattern, "zz-other"}, false)
		if two.Match(value) != (got || value == "zz-other") {
			t.Fatalf("Set{%q, zz-other}.Match(%q) = %v", pattern, value, two.Match(value))
		}
		if !utf8.ValidString(pattern) || !utf8.ValidString(value) {
			return // the regexp reference only handles UTF-8
		}
		want := value != "" && reference(pattern, false).MatchString(value)
		if got != want {
			t.Fatalf("%q.Match(%q) = %v, reference says %v", pattern, value, got, want)
		}
	})
}

func FuzzPath(f *testing.F) {
	for _, s := range [][2]string{
		{"/v1/orders", "/v1/orders"}, {"/v1/*", "/v1/x"}, {"*.js", "/a.js"},
		{"/foo/{*}", "/foo/bar"}, {"/foo/{**}/bar", "/foo/a/b/bar"}, {"/{*}/{**}", "/a/"},
		{"/foo/{**}", "/foo"}, {"/a/{*}/", "/a//"}, {"/x", "/x/../x"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, path string) {
		clean := CleanPath(path)
		if CleanPath(clean) != clean {
			t.Fatalf("CleanPath is not idempotent on %q: %q then %q", path, clean, CleanPath(clean))
		}
		p, err := ParsePath(pattern)
		if err != nil {
			return
		}
		got := p.Match(clean)
		if !utf8.ValidString(pattern) || !utf8.ValidString(clean) {
			return // the regexp reference only handles UTF-8
		}
		want := clean != "" && reference(pattern, true).MatchString(clean)
		if got != want {
			t.Fatalf("%q.Match(%q) = %v, reference says %v", pattern, clean, got, want)
		}
	})
}
