package policy

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	yaml "go.yaml.in/yaml/v2"
)

// Set is a validated collection of security resources, sorted by namespace
// and name so that evaluation does not depend on file order.
type Set struct {
	PeerAuthentications   []*PeerAuthentication
	AuthorizationPolicies []*AuthorizationPolicy
	ServiceEntries        []*ServiceEntry
	DestinationRules      []*DestinationRule
	VirtualServices       []*VirtualService
	HTTPRoutes            []*HTTPRoute
	// Skipped lists documents of other kinds (ServiceEntry, Deployment…)
	// that share the directory; their own loaders read them.
	Skipped []Skipped
	// Warnings are valid input that is probably a mistake.
	Warnings []*Error
	// Files are the files read, in order.
	Files []string
	// Sources are their contents as read, so that a valid set can be kept
	// and parsed again (ParseSources) without the files.
	Sources []SourceFile
}

// SourceFile is one file's name and content.
type SourceFile struct {
	Name string `json:"name"`
	Data []byte `json:"data"`
}

// Digest identifies a list of sources by their names and contents.
func Digest(sources []SourceFile) string {
	h := sha256.New()
	for _, s := range sources {
		fmt.Fprintf(h, "%s\x00%d\x00", s.Name, len(s.Data))
		h.Write(s.Data)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// ParseSources parses files' contents as LoadFiles would the files.
func ParseSources(sources []SourceFile) (*Set, error) {
	inputs := make([]input, 0, len(sources))
	for _, s := range sources {
		inputs = append(inputs, input{name: s.Name, data: s.Data})
	}
	return parse(inputs)
}

// Skipped is a document of a kind this package does not handle.
type Skipped struct {
	Location   Location
	APIVersion string
	Kind       string
}

// maxFileSize bounds what one policy file may hold; policies are small and
// a runaway file should fail loudly rather than exhaust memory.
const maxFileSize = 8 << 20

// LoadDir loads every *.yaml, *.yml and *.json file directly in dir (not in
// subdirectories, as kubectl apply -f; names starting with '.' are skipped,
// which also skips the ..data links of a mounted ConfigMap). Any problem in
// any file fails the whole load, with every problem listed, so that a
// half-valid directory never half-applies.
func LoadDir(dir string) (*Set, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("load policies: %w", err)
	}
	var files []string
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") || !isPolicyFile(name) {
			continue
		}
		path := filepath.Join(dir, name)
		info, err := os.Stat(path) // follows symlinks
		if err != nil {
			return nil, fmt.Errorf("load policies: %w", err)
		}
		if info.Mode().IsRegular() {
			files = append(files, path)
		}
	}
	return LoadFiles(files...)
}

func isPolicyFile(name string) bool {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".yaml", ".yml", ".json":
		return true
	}
	return false
}

// LoadFiles loads the given files as one set.
func LoadFiles(paths ...string) (*Set, error) {
	var (
		inputs []input
		errs   Errors
	)
	for _, p := range paths {
		data, err := readFile(p)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, &Error{File: p, Message: "file does not exist; check the path"})
				continue
			}
			errs = append(errs, &Error{File: p, Message: err.Error()})
			continue
		}
		inputs = append(inputs, input{name: p, data: data})
	}
	set, err := parse(inputs)
	if err != nil {
		var es Errors
		if errors.As(err, &es) {
			errs = append(errs, es...)
		} else {
			return nil, err
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return set, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if info.Size() > maxFileSize {
		return nil, fmt.Errorf("file is %d bytes, more than the %d a policy file may have; split it", info.Size(), maxFileSize)
	}
	var b bytes.Buffer
	if _, err := b.ReadFrom(f); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Parse loads the YAML documents of one file's contents; name is used in
// error messages.
func Parse(name string, data []byte) (*Set, error) {
	return parse([]input{{name: name, data: data}})
}

var yamlLine = regexp.MustCompile(`line (\d+)`)

type input struct {
	name string
	data []byte
}

func parse(inputs []input) (*Set, error) {
	set := &Set{}
	var errs Errors
	for _, in := range inputs {
		set.Files = append(set.Files, in.name)
		set.Sources = append(set.Sources, SourceFile{Name: in.name, Data: in.data})
		if len(in.data) > maxFileSize {
			errs = append(errs, &Error{File: in.name, Message: "file is too large for a policy file; split it"})
			continue
		}
		for _, doc := range splitDocuments(in.data) {
			loc := Location{File: in.name, Document: doc.index, Line: doc.line}
			errs = append(errs, parseDocument(set, loc, doc.first, doc.data)...)
		}
	}
	errs = append(errs, checkDuplicates(set)...)
	if len(errs) > 0 {
		return nil, errs
	}
	slices.SortStableFunc(set.PeerAuthentications, func(a, b *PeerAuthentication) int {
		return compareMeta(a.Metadata, b.Metadata)
	})
	slices.SortStableFunc(set.AuthorizationPolicies, func(a, b *AuthorizationPolicy) int {
		return compareMeta(a.Metadata, b.Metadata)
	})
	slices.SortStableFunc(set.ServiceEntries, func(a, b *ServiceEntry) int { return compareMeta(a.Metadata, b.Metadata) })
	slices.SortStableFunc(set.DestinationRules, func(a, b *DestinationRule) int { return compareMeta(a.Metadata, b.Metadata) })
	slices.SortStableFunc(set.VirtualServices, func(a, b *VirtualService) int { return compareMeta(a.Metadata, b.Metadata) })
	slices.SortStableFunc(set.HTTPRoutes, func(a, b *HTTPRoute) int { return compareMeta(a.Metadata, b.Metadata) })
	return set, nil
}

func compareMeta(a, b Metadata) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

type document struct {
	index int // 1-based
	line  int // 1-based line of the document's first content
	first int // 1-based line of data's first line
	data  []byte
}

// splitDocuments splits a YAML stream at "---" lines itself, rather than
// letting the YAML decoder walk the stream, so that a syntax error in one
// document does not hide the problems of the others and every problem can
// name its document and line. Documents with nothing but comments and blank
// lines are dropped; numbering counts only the remaining ones.
func splitDocuments(data []byte) []document {
	var (
		docs  []document
		cur   []byte
		start = 1
		line  = 0
	)
	flush := func() {
		if content := firstContent(cur); content > 0 {
			docs = append(docs, document{index: len(docs) + 1, line: start + content - 1, first: start, data: cur})
		}
		cur = nil
	}
	for len(data) > 0 {
		line++
		var l []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			l, data = data[:i+1], data[i+1:]
		} else {
			l, data = data, nil
		}
		trimmed := bytes.TrimRight(l, "\r\n")
		switch {
		case bytes.Equal(trimmed, []byte("---")) || bytes.HasPrefix(trimmed, []byte("--- ")) || bytes.HasPrefix(trimmed, []byte("---\t")):
			flush()
			start = line
			// Content after the marker belongs to the new document; blank
			// the marker so columns and line numbers stay as in the file.
			cur = append(cur, "   "...)
			cur = append(cur, l[3:]...)
		case bytes.Equal(trimmed, []byte("...")):
			flush()
			start = line + 1
		default:
			if cur == nil {
				start = line
			}
			cur = append(cur, l...)
		}
	}
	flush()
	return docs
}

// firstContent returns the 1-based line of b's first line that is neither
// blank nor a comment, or 0 if there is none.
func firstContent(b []byte) int {
	n := 0
	for l := range bytes.Lines(b) {
		n++
		t := bytes.TrimSpace(l)
		if len(t) > 0 && t[0] != '#' {
			return n
		}
	}
	return 0
}

// parseDocument decodes, defaults and validates one document into set.
// first is the file line of data's first line, to turn the YAML decoder's
// line numbers into the file's.
func parseDocument(set *Set, loc Location, first int, data []byte) Errors {
	var tree any
	if err := yaml.UnmarshalStrict(data, &tree); err != nil {
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		msg = yamlLine.ReplaceAllStringFunc(msg, func(m string) string {
			n, _ := strconv.Atoi(yamlLine.FindStringSubmatch(m)[1])
			return fmt.Sprintf("line %d", n+first-1)
		})
		return Errors{{File: loc.File, Document: loc.Document, Line: loc.Line,
			Message: "invalid YAML: " + msg + "; fix the syntax"}}
	}
	return decodeObject(set, loc, "", tree)
}

// decodeObject handles one Kubernetes object, or a v1 List of them, at the
// given field path prefix.
func decodeObject(set *Set, loc Location, prefix string, tree any) Errors {
	wrap := func(resource string, fe []*Error) Errors {
		out := make(Errors, 0, len(fe))
		for _, e := range fe {
			e.File, e.Document, e.Line, e.Resource = loc.File, loc.Document, loc.Line, resource
			if prefix != "" {
				e.Field = child(prefix, e.Field)
			}
			out = append(out, e)
		}
		return out
	}
	if tree == nil {
		return nil
	}
	m, ok := tree.(map[any]any)
	if !ok {
		return wrap("", []*Error{{Message: fmt.Sprintf("a document must be a mapping with apiVersion, kind, metadata and spec, not %s", describe(tree))}})
	}
	var d decoder
	var apiVersion, kind string
	d.str("apiVersion", m["apiVersion"], &apiVersion)
	d.str("kind", m["kind"], &kind)
	if len(d.errs) > 0 {
		return wrap("", d.errs)
	}
	group, version, _ := strings.Cut(apiVersion, "/")
	if !strings.Contains(apiVersion, "/") {
		group, version = "", apiVersion
	}
	ours := kind == KindPeerAuthentication || kind == KindAuthorizationPolicy
	securityGroup := group == Group || group == IstioGroup
	networkingKinds := []string{KindServiceEntry, KindDestinationRule, KindVirtualService}
	networking := slices.Contains(networkingKinds, kind)
	networkingGroup := group == NetworkingGroup || group == IstioNetworkingGroup
	switch {
	case networking && ((group == NetworkingGroup && version == "v1") || (group == IstioNetworkingGroup && slices.Contains([]string{"v1", "v1beta1", "v1alpha3"}, version))):
	case !ours && (networkingGroup && similar(kind, networkingKinds) != "" || networking):
		return wrap("", []*Error{{Field: "apiVersion", Message: fmt.Sprintf("%s %s is not supported; use apiVersion %s (%s/v1, v1beta1 and v1alpha3 are accepted as aliases) and kind %s, %s or %s",
			apiVersion, kind, NetworkingAPIVersion, IstioNetworkingGroup, KindServiceEntry, KindDestinationRule, KindVirtualService)}})
	case group == GatewayGroup && kind == KindHTTPRoute && (version == "v1" || version == "v1beta1"):
	case group == GatewayGroup && kind == KindHTTPRoute:
		return wrap("", []*Error{{Field: "apiVersion", Message: fmt.Sprintf("%s is not supported; use %s/v1", apiVersion, GatewayGroup)}})
	case group == GatewayGroup:
		return wrap("", []*Error{{Field: "kind", Message: fmt.Sprintf("%s is not supported: a gateway is a workload of the mesh file (gateway: ...), and routes are HTTPRoutes", kind)}})
	case networkingGroup && !ours:
		return wrap("", []*Error{{Field: "kind", Message: fmt.Sprintf("unknown or unsupported kind %q in %s; allowed: %s, %s, %s", kind, group, KindServiceEntry, KindDestinationRule, KindVirtualService)}})
	case kind == "List" && apiVersion == "v1":
		var errs Errors
		d.list("items", m["items"], func(p string, _ int, e any) {
			errs = append(errs, decodeObject(set, loc, child(prefix, p), e)...)
		})
		return append(wrap("", d.errs), errs...)
	case apiVersion == "" || kind == "":
		return wrap("", []*Error{{Field: missing(apiVersion, kind), Message: fmt.Sprintf("is required; security resources start with apiVersion: %s and kind: %s or %s", APIVersion, KindAuthorizationPolicy, KindPeerAuthentication)}})
	case ours && securityGroup && ((group == Group && version == "v1") || (group == IstioGroup && (version == "v1" || version == "v1beta1"))):
	case ours || securityGroup && similar(kind, []string{KindPeerAuthentication, KindAuthorizationPolicy}) != "":
		return wrap("", []*Error{{Field: "apiVersion", Message: fmt.Sprintf("%s %s is not supported; use apiVersion %s (%s/v1 and %s/v1beta1 are accepted as aliases) and kind %s or %s",
			apiVersion, kind, APIVersion, IstioGroup, IstioGroup, KindAuthorizationPolicy, KindPeerAuthentication)}})
	case securityGroup && kind == "RequestAuthentication":
		return wrap("", []*Error{{Field: "kind", Message: "RequestAuthentication (JWT) is not supported by Trellis yet"}})
	case securityGroup:
		return wrap("", []*Error{{Field: "kind", Message: fmt.Sprintf("unknown kind %q in %s; allowed: %s, %s", kind, group, KindAuthorizationPolicy, KindPeerAuthentication)}})
	default:
		set.Skipped = append(set.Skipped, Skipped{Location: loc, APIVersion: apiVersion, Kind: kind})
		return nil
	}

	var meta Metadata
	top := []field{
		{"apiVersion", ignore},
		{"kind", ignore},
		{"metadata", func(p string, v any) { d.metadata(p, v, &meta) }},
		{"status", ignore},
	}
	if _, ok := m["metadata"]; !ok {
		d.errs.add("metadata", "is required: set metadata.name and metadata.namespace")
	}
	switch kind {
	case KindPeerAuthentication:
		pa := &PeerAuthentication{APIVersion: apiVersion, Location: loc}
		d.object("", m, append(top, field{"spec", func(p string, v any) { d.peerAuthenticationSpec(p, v, &pa.Spec) }}), nil)
		pa.Metadata = meta
		defaultMetadata(&pa.Metadata)
		resource := kind + " " + pa.Metadata.Ref()
		errs, warnings := pa.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.PeerAuthentications = append(set.PeerAuthentications, pa)
	case KindAuthorizationPolicy:
		ap := &AuthorizationPolicy{APIVersion: apiVersion, Location: loc}
		d.object("", m, append(top, field{"spec", func(p string, v any) { d.authorizationPolicySpec(p, v, &ap.Spec) }}), nil)
		ap.Metadata = meta
		defaultMetadata(&ap.Metadata)
		resource := kind + " " + ap.Metadata.Ref()
		errs, warnings := ap.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.AuthorizationPolicies = append(set.AuthorizationPolicies, ap)
	case KindServiceEntry:
		se := &ServiceEntry{APIVersion: apiVersion, Location: loc}
		d.object("", m, append(top, field{"spec", func(p string, v any) { d.serviceEntrySpec(p, v, &se.Spec) }}), nil)
		se.Metadata = meta
		defaultMetadata(&se.Metadata)
		resource := kind + " " + se.Metadata.Ref()
		errs, warnings := se.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.ServiceEntries = append(set.ServiceEntries, se)
	case KindDestinationRule:
		dr := &DestinationRule{APIVersion: apiVersion, Location: loc}
		d.object("", m, append(top, field{"spec", func(p string, v any) { d.destinationRuleSpec(p, v, &dr.Spec) }}), nil)
		dr.Metadata = meta
		defaultMetadata(&dr.Metadata)
		resource := kind + " " + dr.Metadata.Ref()
		errs, warnings := dr.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		dr.resolveFiles()
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.DestinationRules = append(set.DestinationRules, dr)
	case KindVirtualService:
		vs := &VirtualService{APIVersion: apiVersion, Location: loc}
		d.object("", m, append(top, field{"spec", func(p string, v any) { d.virtualServiceSpec(p, v, &vs.Spec) }}), nil)
		vs.Metadata = meta
		defaultMetadata(&vs.Metadata)
		resource := kind + " " + vs.Metadata.Ref()
		errs, warnings := vs.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.VirtualServices = append(set.VirtualServices, vs)
	case KindHTTPRoute:
		hr := &HTTPRoute{APIVersion: apiVersion, Location: loc}
		defaultMetadata(&meta) // the namespace parentRefs and backendRefs default to
		d.object("", m, append(top[:len(top):len(top)], field{"spec", func(p string, v any) { d.httpRouteSpec(p, v, &hr.Spec, meta.Namespace) }}), nil)
		hr.Metadata = meta
		defaultMetadata(&hr.Metadata)
		resource := kind + " " + hr.Metadata.Ref()
		errs, warnings := hr.Validate()
		if errs = merge(d.errs, errs); len(errs) > 0 {
			return wrap(resource, errs)
		}
		set.Warnings = append(set.Warnings, wrap(resource, warnings)...)
		set.HTTPRoutes = append(set.HTTPRoutes, hr)
	}
	return nil
}

func missing(apiVersion, kind string) string {
	if apiVersion == "" {
		return "apiVersion"
	}
	return "kind"
}

// defaultMetadata applies Kubernetes' default namespace.
func defaultMetadata(m *Metadata) {
	if m.Namespace == "" {
		m.Namespace = DefaultNamespace
	}
}

// checkDuplicates rejects two resources of one kind with the same namespace
// and name: which of them should win would be a guess.
func checkDuplicates(set *Set) Errors {
	var errs Errors
	seen := map[string]Location{}
	check := func(kind string, m Metadata, loc Location) {
		k := kind + " " + m.Ref()
		if first, ok := seen[k]; ok {
			errs = append(errs, &Error{File: loc.File, Document: loc.Document, Line: loc.Line, Resource: k, Field: "metadata.name",
				Message: fmt.Sprintf("%s is already defined in %s document %d; names must be unique per kind and namespace, so rename or remove one", k, first.File, first.Document)})
			return
		}
		seen[k] = loc
	}
	for _, pa := range set.PeerAuthentications {
		check(KindPeerAuthentication, pa.Metadata, pa.Location)
	}
	for _, ap := range set.AuthorizationPolicies {
		check(KindAuthorizationPolicy, ap.Metadata, ap.Location)
	}
	for _, se := range set.ServiceEntries {
		check(KindServiceEntry, se.Metadata, se.Location)
	}
	for _, dr := range set.DestinationRules {
		check(KindDestinationRule, dr.Metadata, dr.Location)
	}
	for _, vs := range set.VirtualServices {
		check(KindVirtualService, vs.Metadata, vs.Location)
	}
	for _, hr := range set.HTTPRoutes {
		check(KindHTTPRoute, hr.Metadata, hr.Location)
	}
	return append(errs, checkNetworking(set)...)
}

// merge adds to the decoding problems the validation problems about other
// fields: a field that failed to decode has a zero value, and validating it
// would only repeat the problem in a more confusing way.
func merge(decoding, validation []*Error) []*Error {
	out := decoding
	for _, v := range validation {
		shadowed := false
		for _, d := range decoding {
			if v.Field == d.Field || strings.HasPrefix(v.Field, d.Field+".") || strings.HasPrefix(v.Field, d.Field+"[") || strings.HasPrefix(d.Field, v.Field+".") {
				shadowed = true
				break
			}
		}
		if !shadowed {
			out = append(out, v)
		}
	}
	return out
}
