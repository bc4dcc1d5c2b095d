package proxy

import (
	"errors"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy/match"
)

// errAmbiguousPath is returned for paths whose meaning depends on who
// decodes them: an encoded '/' or '\' is one segment to a proxy and two to
// many applications, which is how path rules get bypassed.
var errAmbiguousPath = errors.New("the path contains an encoded '/' or '\\'")

// NormalizePath turns a request's escaped path into the one form that is
// both authorized and forwarded, as Istio's default (BASE) normalization
// does: percent-encoded unreserved characters (letters, digits, "-._~") are
// decoded, the remaining escapes are upper-cased, and "." and ".." segments
// are resolved. "/%61dmin" and "/x/%2e%2e/admin" both become "/admin", so
// the application can never see a path the policy did not.
func NormalizePath(escaped string) (string, error) {
	if escaped == "" {
		return "/", nil
	}
	var b strings.Builder
	changed := false
	for i := 0; i < len(escaped); i++ {
		c := escaped[i]
		if c == '\\' {
			return "", errAmbiguousPath
		}
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(escaped) || !isHex(escaped[i+1]) || !isHex(escaped[i+2]) {
			return "", errors.New("the path contains a malformed percent-encoding")
		}
		v := unhex(escaped[i+1])<<4 | unhex(escaped[i+2])
		switch {
		case v == '/' || v == '\\':
			return "", errAmbiguousPath
		case isUnreserved(v):
			b.WriteByte(v)
			changed = true
		default:
			const digits = "0123456789ABCDEF"
			b.WriteByte('%')
			b.WriteByte(digits[v>>4])
			b.WriteByte(digits[v&15])
			changed = changed || escaped[i+1] != digits[v>>4] || escaped[i+2] != digits[v&15]
		}
		i += 2
	}
	p := escaped
	if changed {
		p = b.String()
	}
	if !strings.HasPrefix(p, "/") && p != "*" {
		return "", errors.New("the path does not start with '/'")
	}
	if hasDotSegmentWithParams(p) {
		return "", errDotParams
	}
	return match.CleanPath(p), nil
}

// errDotParams refuses "..;x" and ".;x" segments: servlet containers
// (Tomcat, Jetty) drop path parameters and then resolve the dots, so
// /public/..;/admin is /admin to them while it matches /public/* here.
var errDotParams = errors.New("the path has a '.' or '..' segment with parameters (';'), which some servers resolve and others do not")

func hasDotSegmentWithParams(p string) bool {
	for seg := range strings.SplitSeq(p, "/") {
		if base, _, ok := strings.Cut(seg, ";"); ok && (base == "." || base == "..") {
			return true
		}
	}
	return false
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

func isUnreserved(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
