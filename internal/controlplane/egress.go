package controlplane

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"os"
	"slices"
	"time"

	"github.com/trellis-mesh/trellis/internal/policy"
)

// tlsFileWarnings checks the files the DestinationRules name, as the
// sidecars on this machine will read them: missing or unreadable files, a
// key that is not the certificate's, a client certificate out of its
// validity, a CA file without certificates. They are warnings, not
// rejections: the sidecars read the files again when they change, and
// meanwhile fail the requests with a 502 that says the same.
func tlsFileWarnings(set *policy.Set, now time.Time) []ResourceError {
	var out []ResourceError
	for _, dr := range set.DestinationRules {
		warn := func(field, format string, args ...any) {
			out = append(out, ResourceError{File: dr.Location.File, Line: dr.Location.Line, Resource: policy.KindDestinationRule + " " + dr.Metadata.Ref(),
				Field: field, Message: fmt.Sprintf(format, args...)})
		}
		check := func(field string, t *policy.ClientTLS) {
			if t == nil || t.Mode == policy.TLSDisable {
				return
			}
			if t.InsecureSkipVerify {
				warn(field+".insecureSkipVerify", "is true: the server is not verified at all (caCertificates, sni and subjectAltNames are ignored); use it for tests only")
			}
			if t.CACertificates != "" {
				if data, err := os.ReadFile(t.CACertificates); err != nil {
					warn(field+".caCertificates", "%v", err)
				} else if !x509.NewCertPool().AppendCertsFromPEM(data) {
					warn(field+".caCertificates", "%s holds no PEM certificate", t.CACertificates)
				}
			}
			if t.Mode != policy.TLSMutual {
				return
			}
			for _, f := range [][2]string{{"clientCertificate", t.ClientCertificate}, {"privateKey", t.PrivateKey}} {
				if _, err := os.Stat(f[1]); err != nil {
					warn(field+"."+f[0], "%v", err)
					return
				}
			}
			pair, err := tls.LoadX509KeyPair(t.ClientCertificate, t.PrivateKey)
			if err != nil {
				warn(field+".privateKey", "%s and %s: %v", t.ClientCertificate, t.PrivateKey, err)
				return
			}
			if leaf := pair.Leaf; leaf != nil && (now.After(leaf.NotAfter) || now.Before(leaf.NotBefore)) {
				warn(field+".clientCertificate", "%s is valid from %s to %s only", t.ClientCertificate, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
			}
		}
		check("spec.trafficPolicy.tls", dr.Spec.TLS)
		for _, port := range slices.Sorted(maps.Keys(dr.Spec.PortTLS)) {
			check(fmt.Sprintf("spec.trafficPolicy.portLevelSettings[port %d].tls", port), dr.Spec.PortTLS[port])
		}
	}
	return out
}
