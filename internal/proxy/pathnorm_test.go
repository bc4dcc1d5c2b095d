package proxy

import (
	"net/url"
	"strings"
	"testing"
)

func TestNormalizePath(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      bool
	}{
		{"/", "/", false},
		{"", "/", false},
		{"/v1/orders", "/v1/orders", false},
		{"/%61dmin", "/admin", false},
		{"/x/%2e%2e/admin", "/admin", false},
		{"/x/%2E%2E/admin", "/admin", false},
		{"/public/../admin", "/admin", false},
		{"/public/./a", "/public/a", false},
		{"/a%7eb", "/a~b", false},
		{"/a%20b", "/a%20b", false},
		{"/a%2ab", "/a%2Ab", false},
		{"/a//b", "/a//b", false}, // repeated slashes kept, as Istio's BASE
		{"/admin%2F", "", true},
		{"/admin%2fx", "", true},
		{"/a%5cb", "", true},
		{"/a\\b", "", true},
		{"/a%zz", "", true},
		{"/a%2", "", true},
		{"relative", "", true},
		{"/public/..;/admin", "", true}, // servlet path parameters
		{"/public/..;jsessionid=x/admin", "", true},
		{"/public/.;x/a", "", true},
		{"/public/%2e%2e;/admin", "", true},
		{"/a;b/c", "/a;b/c", false}, // parameters elsewhere are the application's
	} {
		got, err := NormalizePath(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("NormalizePath(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/%61dmin", "/x/%2e%2e/admin", "/a/../../b", "/a%2Fb", "/%7E/./x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := NormalizePath(in)
		if err != nil {
			return
		}
		// Idempotent, no dot segment left, and what an application decodes
		// is what was authorized, segment for segment.
		again, err := NormalizePath(out)
		if err != nil || again != out {
			t.Fatalf("NormalizePath(%q) = %q, then %q, %v", in, out, again, err)
		}
		for _, seg := range strings.Split(out, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("NormalizePath(%q) = %q keeps a dot segment", in, out)
			}
		}
		dec, err := url.PathUnescape(out)
		if err != nil {
			t.Fatalf("NormalizePath(%q) = %q does not decode: %v", in, out, err)
		}
		if strings.Count(dec, "/") != strings.Count(out, "/") {
			t.Fatalf("NormalizePath(%q) = %q decodes to more segments: %q", in, out, dec)
		}
	})
}
