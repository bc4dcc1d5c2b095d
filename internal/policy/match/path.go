package match

import (
	"errors"
	"strings"
)

// Path is a parsed entry of an operation's paths or notPaths: either a
// String pattern or a path template.
//
// Path templates follow Istio's "Operation" reference: "{*}" matches exactly
// one path segment and "{**}" matches any number of characters including
// '/'; each operator must be a whole segment, "{**}" must be the last
// operator, and a template mixes with no other '*'. The characters an
// operator can match are RFC 3986 pchars, as in Envoy's URI templates that
// Istio translates them to.
type Path struct {
	str      String
	template bool
	head     []segment // segments before "{**}", or all of them
	any      bool      // the template has "{**}"
	tail     string    // literal text after "{**}", starting with '/' (or "")
	// lead and trail are the literal text before the first operator and
	// after the last one: a cheap first check that rejects most paths.
	lead, trail string
}

type segment struct {
	one     bool   // "{*}"
	literal string // otherwise
}

// Errors returned by ParsePath besides ErrEmpty and ErrInnerWildcard.
var (
	ErrPathStart     = errors.New(`a path must start with '/', or with '*' for a suffix match`)
	ErrBraces        = errors.New(`'{' and '}' may only form a whole path segment "{*}" or "{**}"`)
	ErrAnyNotLast    = errors.New(`"{**}" must be the last operator of a path template`)
	ErrTemplateStar  = errors.New(`a path template cannot also use '*' wildcards; use "{*}" for one segment or "{**}" for the rest`)
	ErrTemplateChars = errors.New(`a path template segment may only contain RFC 3986 path characters`)
)

const (
	matchOne = "{*}"
	matchAny = "{**}"
)

// ParsePath parses a path pattern.
func ParsePath(pattern string) (Path, error) {
	if pattern == "" {
		return Path{}, ErrEmpty
	}
	if !strings.ContainsAny(pattern, "{}") {
		if pattern[0] != '/' && pattern[0] != '*' {
			return Path{}, ErrPathStart
		}
		s, err := ParseString(pattern)
		if err != nil {
			return Path{}, err
		}
		return Path{str: s}, nil
	}
	if pattern[0] != '/' {
		return Path{}, ErrPathStart
	}
	p := Path{template: true, str: String{pattern: pattern}}
	segs := strings.Split(pattern[1:], "/")
	for i, seg := range segs {
		switch {
		case seg == matchAny:
			if p.any {
				return Path{}, ErrAnyNotLast
			}
			p.any = true
			if rest := segs[i+1:]; len(rest) > 0 {
				p.tail = "/" + strings.Join(rest, "/")
			}
		case seg == matchOne:
			if p.any {
				return Path{}, ErrAnyNotLast
			}
			p.head = append(p.head, segment{one: true})
		case strings.ContainsAny(seg, "{}"):
			return Path{}, ErrBraces
		case strings.Contains(seg, "*"):
			return Path{}, ErrTemplateStar
		case !validLiteral(seg):
			return Path{}, ErrTemplateChars
		case !p.any:
			p.head = append(p.head, segment{literal: seg})
		}
	}
	first := strings.Index(pattern, "{")
	last := strings.LastIndex(pattern, "}")
	p.lead, p.trail = pattern[:first], pattern[last+1:]
	return p, nil
}

// String returns the pattern as written.
func (p *Path) String() string { return p.str.pattern }

// Match reports whether the request path matches. The path should already be
// cleaned (see CleanPath): no query, no fragment, no dot segments.
func (p *Path) Match(path string) bool {
	if !p.template {
		return p.str.Match(path)
	}
	if len(path) < len(p.lead)+len(p.trail) || !strings.HasPrefix(path, p.lead) || !strings.HasSuffix(path, p.trail) {
		return false
	}
	rest := path[1:]
	for i, seg := range p.head {
		var cur string
		if i == len(p.head)-1 && !p.any {
			// The final segment runs to the end of the path.
			if strings.IndexByte(rest, '/') >= 0 {
				return false
			}
			cur, rest = rest, ""
		} else {
			j := strings.IndexByte(rest, '/')
			if j < 0 {
				return false
			}
			cur, rest = rest[:j], rest[j+1:]
		}
		if seg.one {
			if cur == "" || !allPchar(cur, false) {
				return false
			}
		} else if cur != seg.literal {
			return false
		}
	}
	if !p.any {
		return true
	}
	// rest is what "{**}" and the literal tail after it must cover.
	if len(rest) < len(p.tail) || rest[len(rest)-len(p.tail):] != p.tail {
		return false
	}
	return allPchar(rest[:len(rest)-len(p.tail)], true)
}

// validLiteral reports whether a template's literal segment holds only pchars.
func validLiteral(s string) bool { return allPchar(s, false) }

// allPchar reports whether s holds only RFC 3986 pchars (and '/' if slash).
func allPchar(s string, slash bool) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("-._~%!$&'()*+,;=:@", c) >= 0:
		case c == '/' && slash:
		default:
			return false
		}
	}
	return true
}

// CleanPath returns the part of a request path that policies match: without
// query or fragment, and with "." and ".." segments resolved as RFC 3986
// section 5.2.4 describes (the normalization Istio applies by default, so
// that "/public/../admin" cannot slip past a rule about "/admin"). Repeated
// slashes are kept, as in Istio's default. A path that needs no change is
// returned as is, without allocating.
func CleanPath(p string) string {
	if i := strings.IndexAny(p, "?#"); i >= 0 {
		p = p[:i]
	}
	if !hasDotSegment(p) {
		return p
	}
	return removeDotSegments(p)
}

func hasDotSegment(p string) bool {
	for i := 0; i < len(p); i++ {
		if p[i] != '.' || (i > 0 && p[i-1] != '/') {
			continue
		}
		// p[i] starts a segment with '.'; it is a dot segment if it is "." or "..".
		j := i + 1
		if j < len(p) && p[j] == '.' {
			j++
		}
		if j == len(p) || p[j] == '/' {
			return true
		}
	}
	return false
}

// removeDotSegments is RFC 3986 section 5.2.4 over '/'-separated segments.
func removeDotSegments(p string) string {
	absolute := strings.HasPrefix(p, "/")
	segs := strings.Split(p, "/")
	if absolute {
		segs = segs[1:]
	}
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	r := strings.Join(out, "/")
	if absolute {
		r = "/" + r
	}
	return r
}
