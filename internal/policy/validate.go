package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/trellis-mesh/trellis/internal/policy/match"
)

// Validation runs on decoded resources, after defaults. It checks values the
// type system cannot: names, enums, patterns, ports, addresses, and the
// combinations Istio's own validation rejects. Warnings are for input that
// is valid but almost certainly not what was meant.

var (
	dns1123Label     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dns1123Subdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	labelName        = regexp.MustCompile(`^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`)
	labelValue       = regexp.MustCompile(`^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$`)
	headerName       = regexp.MustCompile(`^:?[!#$%&'*+\-.^_` + "`" + `|~0-9A-Za-z]+$`)
)

var (
	modes   = []string{string(ModeStrict), string(ModePermissive), string(ModeDisable), string(ModeUnset)}
	actions = []string{string(ActionAllow), string(ActionDeny), string(ActionAudit)}
)

// Validate checks a PeerAuthentication and returns its problems and
// warnings, with field paths relative to the document.
func (pa *PeerAuthentication) Validate() (errs, warnings []*Error) {
	var fe, fw fieldErrors
	validateMetadata(&fe, &pa.Metadata)
	for _, a := range []string{DryRunAnnotation, IstioDryRunAnnotation} {
		if _, ok := pa.Metadata.Annotations[a]; ok {
			fe.add(key("metadata.annotations", a), "dry-run applies to AuthorizationPolicy only; remove it and roll out with mode PERMISSIVE first")
		}
	}
	s := &pa.Spec
	validateSelector(&fe, "spec.selector", s.Selector)
	if s.MTLS != nil {
		validateMode(&fe, "spec.mtls.mode", s.MTLS.Mode)
	}
	if len(s.PortLevelMTLS) > 0 && s.Selector.Empty() {
		fe.add("spec.portLevelMtls", "only a workload PeerAuthentication (with spec.selector.matchLabels) can set portLevelMtls; add a selector or move the port settings to a workload policy")
	}
	for _, port := range slices.Sorted(maps.Keys(s.PortLevelMTLS)) {
		m := s.PortLevelMTLS[port]
		p := key("spec.portLevelMtls", strconv.FormatUint(uint64(port), 10))
		if port == 0 || port > 65535 {
			fe.add(p, "port must be from 1 to 65535")
		}
		if m.Mode == "" {
			fe.add(child(p, "mode"), "is required; allowed: %s", strings.Join(modes, ", "))
			continue
		}
		validateMode(&fe, child(p, "mode"), m.Mode)
	}
	if pa.Metadata.Namespace == DefaultRootNamespace && !s.Selector.Empty() {
		fw.add("spec.selector", "a PeerAuthentication with a selector in the root namespace %s applies only to workloads in %s, not mesh-wide; remove the selector for a mesh-wide policy", DefaultRootNamespace, DefaultRootNamespace)
	}
	return fe, fw
}

func validateMode(fe *fieldErrors, path string, m MTLSMode) {
	if m == "" || slices.Contains(modes, string(m)) {
		return
	}
	fe.add(path, "unknown mode %q; allowed: %s%s", m, strings.Join(modes, ", "), didYouMean(string(m), modes))
}

func didYouMean(got string, allowed []string) string {
	for _, a := range allowed {
		if strings.EqualFold(a, got) {
			return fmt.Sprintf(" (did you mean %s?)", a)
		}
	}
	return ""
}

func validateMetadata(fe *fieldErrors, m *Metadata) {
	switch {
	case m.Name == "":
		fe.add("metadata.name", "is required")
	case len(m.Name) > 253 || !dns1123Subdomain.MatchString(m.Name):
		fe.add("metadata.name", "%q is not a valid name: use lower case letters, digits, '-' and '.', starting and ending with a letter or digit", m.Name)
	}
	if len(m.Namespace) > 63 || !dns1123Label.MatchString(m.Namespace) {
		fe.add("metadata.namespace", "%q is not a valid namespace: use lower case letters, digits and '-', at most 63, starting and ending with a letter or digit", m.Namespace)
	}
	validateLabels(fe, "metadata.labels", m.Labels)
}

func validateSelector(fe *fieldErrors, path string, s *Selector) {
	if s == nil {
		return
	}
	validateLabels(fe, child(path, "matchLabels"), s.MatchLabels)
}

func validateLabels(fe *fieldErrors, path string, labels map[string]string) {
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		name := k
		if i := strings.LastIndexByte(k, '/'); i >= 0 {
			prefix := k[:i]
			name = k[i+1:]
			if prefix == "" || len(prefix) > 253 || !dns1123Subdomain.MatchString(prefix) {
				fe.add(key(path, k), "label key prefix %q must be a DNS subdomain such as example.com", prefix)
				continue
			}
		}
		if len(name) > 63 || !labelName.MatchString(name) {
			fe.add(key(path, k), "label key %q is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit", k)
		}
		if v := labels[k]; len(v) > 63 || !labelValue.MatchString(v) {
			fe.add(key(path, k), "label value %q is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit", v)
		}
	}
}

// Validate checks an AuthorizationPolicy and returns its problems and
// warnings, with field paths relative to the document.
func (ap *AuthorizationPolicy) Validate() (errs, warnings []*Error) {
	var fe, fw fieldErrors
	validateMetadata(&fe, &ap.Metadata)
	for _, a := range []string{DryRunAnnotation, IstioDryRunAnnotation} {
		if v, ok := ap.Metadata.Annotations[a]; ok && v != "true" && v != "false" {
			fe.add(key("metadata.annotations", a), "must be \"true\" or \"false\", not %q", v)
		}
	}
	s := &ap.Spec
	validateSelector(&fe, "spec.selector", s.Selector)
	switch {
	case s.Action == "" || slices.Contains(actions, string(s.Action)):
	case s.Action == ActionCustom:
		fe.add("spec.action", "CUSTOM (an external authorizer) is not supported yet; allowed: %s", strings.Join(actions, ", "))
	default:
		fe.add("spec.action", "unknown action %q; allowed: %s%s", s.Action, strings.Join(actions, ", "), didYouMean(string(s.Action), actions))
	}
	for i := range s.Rules {
		validateRule(&fe, &fw, index("spec.rules", i), &s.Rules[i])
	}
	return fe, fw
}

func validateRule(fe, fw *fieldErrors, path string, r *Rule) {
	for i, f := range r.From {
		p := index(child(path, "from"), i)
		if f.Source == nil {
			fe.add(child(p, "source"), "is required; set at least one of principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks")
			continue
		}
		validateSource(fe, child(p, "source"), f.Source)
	}
	for i, t := range r.To {
		p := index(child(path, "to"), i)
		if t.Operation == nil {
			fe.add(child(p, "operation"), "is required; set at least one of hosts, notHosts, ports, notPorts, methods, notMethods, paths, notPaths")
			continue
		}
		validateOperation(fe, fw, child(p, "operation"), t.Operation)
	}
	for i := range r.When {
		validateCondition(fe, index(child(path, "when"), i), &r.When[i])
	}
}

func validateSource(fe *fieldErrors, path string, s *Source) {
	if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces)+len(s.IPBlocks)+len(s.NotIPBlocks) == 0 {
		fe.add(path, "must set at least one of principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks; to match any source, leave out from")
		return
	}
	eachValue(fe, child(path, "principals"), s.Principals, checkPrincipal)
	eachValue(fe, child(path, "notPrincipals"), s.NotPrincipals, checkPrincipal)
	eachValue(fe, child(path, "namespaces"), s.Namespaces, checkPattern)
	eachValue(fe, child(path, "notNamespaces"), s.NotNamespaces, checkPattern)
	eachValue(fe, child(path, "ipBlocks"), s.IPBlocks, checkIPBlock)
	eachValue(fe, child(path, "notIpBlocks"), s.NotIPBlocks, checkIPBlock)
}

func validateOperation(fe, fw *fieldErrors, path string, o *Operation) {
	if len(o.Hosts)+len(o.NotHosts)+len(o.Ports)+len(o.NotPorts)+len(o.Methods)+len(o.NotMethods)+len(o.Paths)+len(o.NotPaths) == 0 {
		fe.add(path, "must set at least one of hosts, notHosts, ports, notPorts, methods, notMethods, paths, notPaths; to match any operation, leave out to")
		return
	}
	eachValue(fe, child(path, "hosts"), o.Hosts, checkPattern)
	eachValue(fe, child(path, "notHosts"), o.NotHosts, checkPattern)
	eachValue(fe, child(path, "ports"), o.Ports, checkPort)
	eachValue(fe, child(path, "notPorts"), o.NotPorts, checkPort)
	eachValue(fe, child(path, "methods"), o.Methods, checkPattern)
	eachValue(fe, child(path, "notMethods"), o.NotMethods, checkPattern)
	eachValue(fe, child(path, "paths"), o.Paths, checkPath)
	eachValue(fe, child(path, "notPaths"), o.NotPaths, checkPath)
	for _, f := range []struct {
		name   string
		values []string
	}{{"methods", o.Methods}, {"notMethods", o.NotMethods}} {
		for i, m := range f.values {
			if m != strings.ToUpper(m) {
				fw.add(index(child(path, f.name), i), "HTTP methods are case-sensitive and %q is not upper case, so it will never match a standard method; write %q", m, strings.ToUpper(m))
			}
		}
	}
}

// Keys of "when" conditions.
const (
	KeySourcePrincipal = "source.principal"
	KeySourceNamespace = "source.namespace"
	KeySourceIP        = "source.ip"
	KeyDestinationPort = "destination.port"
	keyHeaderPrefix    = "request.headers["
)

var supportedKeys = []string{"request.headers[NAME]", KeySourceIP, KeySourceNamespace, KeySourcePrincipal, KeyDestinationPort}

// Istio condition keys that Trellis does not evaluate yet.
var unsupportedKeys = map[string]string{
	"remote.ip":      "use source.ip (the peer address)",
	"destination.ip": "destination addresses are not part of the request Trellis evaluates",
	"connection.sni": "SNI is not part of the request Trellis evaluates",
}

// HeaderKey returns the header name of a "request.headers[NAME]" key.
func HeaderKey(k string) (string, bool) {
	if !strings.HasPrefix(k, keyHeaderPrefix) || !strings.HasSuffix(k, "]") {
		return "", false
	}
	return k[len(keyHeaderPrefix) : len(k)-1], true
}

func validateCondition(fe *fieldErrors, path string, c *Condition) {
	kp := child(path, "key")
	var check func(string) string
	switch {
	case c.Key == "":
		fe.add(kp, "is required; allowed: %s", strings.Join(supportedKeys, ", "))
		return
	case c.Key == KeySourcePrincipal:
		check = checkPrincipal
	case c.Key == KeySourceNamespace:
		check = checkPattern
	case c.Key == KeySourceIP:
		check = checkIPBlock
	case c.Key == KeyDestinationPort:
		check = checkPort
	case strings.HasPrefix(c.Key, keyHeaderPrefix):
		name, ok := HeaderKey(c.Key)
		if !ok || !headerName.MatchString(name) {
			fe.add(kp, "%q is not a valid header key; write request.headers[NAME] with an HTTP header name, e.g. request.headers[x-user-id]", c.Key)
			return
		}
		check = checkPattern
	case strings.HasPrefix(c.Key, "request.auth."):
		fe.add(kp, "%q is not supported by Trellis yet: %s; allowed: %s", c.Key, noJWT, strings.Join(supportedKeys, ", "))
		return
	case strings.HasPrefix(c.Key, "experimental."):
		fe.add(kp, "%q is not supported by Trellis; allowed: %s", c.Key, strings.Join(supportedKeys, ", "))
		return
	default:
		if why, ok := unsupportedKeys[c.Key]; ok {
			fe.add(kp, "%q is not supported by Trellis yet: %s; allowed: %s", c.Key, why, strings.Join(supportedKeys, ", "))
		} else {
			fe.add(kp, "unknown key %q; allowed: %s", c.Key, strings.Join(supportedKeys, ", "))
		}
		return
	}
	if len(c.Values) == 0 && len(c.NotValues) == 0 {
		fe.add(path, "must set values or notValues (or both)")
		return
	}
	eachValue(fe, child(path, "values"), c.Values, check)
	eachValue(fe, child(path, "notValues"), c.NotValues, check)
}

// eachValue runs check on every value; check returns "" or a message.
func eachValue(fe *fieldErrors, path string, values []string, check func(string) string) {
	for i, v := range values {
		if msg := check(v); msg != "" {
			fe.add(index(path, i), "%s", msg)
		}
	}
}

func checkPattern(v string) string {
	if _, err := match.ParseString(v); err != nil {
		return fmt.Sprintf("invalid value %q: %v", v, err)
	}
	return ""
}

func checkPrincipal(v string) string {
	if msg := checkPattern(v); msg != "" {
		return msg
	}
	if rest, ok := strings.CutPrefix(v, "spiffe://"); ok {
		return fmt.Sprintf("principals are written without the spiffe:// scheme, as in Istio; write %q", rest)
	}
	return ""
}

func checkPath(v string) string {
	if _, err := match.ParsePath(v); err != nil {
		return fmt.Sprintf("invalid path pattern %q: %v", v, err)
	}
	return ""
}

func checkPort(v string) string {
	if _, ok := parsePort(v); !ok {
		return fmt.Sprintf("invalid port %q: write a port number from 1 to 65535 (wildcards are not allowed)", v)
	}
	return ""
}

func checkIPBlock(v string) string {
	if _, err := ParseIPBlock(v); err != nil {
		return fmt.Sprintf("invalid IP block %q: write an address such as 10.1.2.3 or a CIDR range such as 10.1.0.0/16", v)
	}
	return ""
}

// ParseIPBlock parses an address or CIDR range of ipBlocks or source.ip; a
// single address is a /32 or /128 range, and host bits of a range are
// ignored, as Envoy's CIDR ranges do.
func ParseIPBlock(v string) (netip.Prefix, error) {
	if strings.Contains(v, "/") {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(v)
	if err != nil {
		return netip.Prefix{}, err
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("zoned address %q", v)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// ParsePort parses a port of ports, notPorts or destination.port.
func ParsePort(v string) (uint32, bool) { return parsePort(v) }

func parsePort(v string) (uint32, bool) {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || n < 1 || n > 65535 || (len(v) > 1 && v[0] == '0') {
		return 0, false
	}
	return uint32(n), true
}
