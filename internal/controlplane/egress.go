package controlplane

import (
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/trellis-mesh/trellis/internal/policy"
	"github.com/trellis-mesh/trellis/internal/tlsfiles"
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
			// What the sidecars will make of the files, in their words.
			client := tlsfiles.Client{Mutual: t.Mode == policy.TLSMutual, Certificate: t.ClientCertificate, PrivateKey: t.PrivateKey,
				CACertificates: t.CACertificates, SNI: t.SNI, SubjectAltNames: t.SubjectAltNames, InsecureSkipVerify: t.InsecureSkipVerify}
			if _, err := client.Config(dr.Spec.Host, now); err != nil {
				warn(field, "%v", err)
			}
		}
		check("spec.trafficPolicy.tls", dr.Spec.TLS)
		for _, port := range slices.Sorted(maps.Keys(dr.Spec.PortTLS)) {
			check(fmt.Sprintf("spec.trafficPolicy.portLevelSettings[port %d].tls", port), dr.Spec.PortTLS[port])
		}
	}
	return out
}
