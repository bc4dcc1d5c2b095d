package policy

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalid is matched (errors.Is) by every error that reports invalid
// policy files.
var ErrInvalid = errors.New("invalid policy configuration")

// Error is one problem in a policy file.
type Error struct {
	File     string
	Document int    // 1-based document index; 0 when about the whole file
	Line     int    // line where the document starts; 0 when unknown
	Resource string // "AuthorizationPolicy shipping/allow-x" once known
	Field    string // path inside the document, e.g. "spec.rules[0].to[0].operation.paths[1]"
	Message  string // what is wrong and what is allowed
}

func (e *Error) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
	} else {
		b.WriteString("<input>")
	}
	if e.Document > 0 {
		fmt.Fprintf(&b, ": document %d", e.Document)
		if e.Line > 0 {
			fmt.Fprintf(&b, " (line %d)", e.Line)
		}
	}
	if e.Resource != "" {
		fmt.Fprintf(&b, ", %s", e.Resource)
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Message)
	return b.String()
}

// Is makes every Error match ErrInvalid.
func (e *Error) Is(target error) bool { return target == ErrInvalid }

// Errors is every problem found while loading; loading fails as a whole when
// there is any.
type Errors []*Error

func (es Errors) Error() string {
	if len(es) == 1 {
		return es[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d problems in policy files:", len(es))
	for _, e := range es {
		b.WriteString("\n  ")
		b.WriteString(e.Error())
	}
	return b.String()
}

// Is makes Errors match ErrInvalid.
func (es Errors) Is(target error) bool { return target == ErrInvalid }

// fieldErrors collects problems with field paths relative to a document.
type fieldErrors []*Error

func (fe *fieldErrors) add(field, format string, args ...any) {
	*fe = append(*fe, &Error{Field: field, Message: fmt.Sprintf(format, args...)})
}

// path helpers build Kubernetes-style field paths.
func child(parent, name string) string {
	if parent == "" {
		return name
	}
	return parent + "." + name
}

func index(parent string, i int) string { return fmt.Sprintf("%s[%d]", parent, i) }

func key(parent string, k string) string { return parent + "[" + k + "]" }
