// Package sniff classifies the first bytes of a connection without consuming
// them: a TLS ClientHello (with its SNI and ALPN, which tell a mesh
// connection from an application's own TLS), an HTTP/2 prior-knowledge
// preface, an HTTP/1.x request line, or something else. The proxy peeks at
// most a few kilobytes and decides; everything here is pure and fuzzed.
package sniff

import (
	"bytes"
	"encoding/binary"
	"errors"
)

// ErrNeedMore means the bytes so far are a valid prefix but not enough to
// decide; the caller should read more (within its deadline).
var ErrNeedMore = errors.New("sniff: need more bytes")

// ErrNotClientHello means the bytes are not a TLS ClientHello.
var ErrNotClientHello = errors.New("sniff: not a TLS ClientHello")

// MaxClientHello bounds how much the proxy buffers to read a ClientHello;
// real ones are a few hundred bytes (post-quantum key shares make them about
// 1.8 KB), and a peer sending more before the handshake is not worth waiting
// for.
const MaxClientHello = 16 * 1024

// ClientHello is what routing needs from a TLS ClientHello.
type ClientHello struct {
	ServerName string
	ALPN       []string
}

// IsTLS reports whether b starts like a TLS handshake record (content type
// 22, major version 3). One byte is enough to rule TLS out.
func IsTLS(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	if b[0] != 0x16 {
		return false
	}
	return len(b) < 2 || b[1] == 0x03
}

// ParseClientHello extracts SNI and ALPN from the ClientHello at the start
// of b. It returns ErrNeedMore while b holds only a prefix of the record.
// It reads only the first handshake record: a ClientHello fragmented over
// several records is reported as not a ClientHello, which makes the caller
// fall back to ordinary handling, never misroute.
func ParseClientHello(b []byte) (ClientHello, error) {
	var ch ClientHello
	if len(b) < 5 {
		if len(b) > 0 && !IsTLS(b) {
			return ch, ErrNotClientHello
		}
		return ch, ErrNeedMore
	}
	if !IsTLS(b) {
		return ch, ErrNotClientHello
	}
	recLen := int(binary.BigEndian.Uint16(b[3:5]))
	if recLen < 4 || recLen > MaxClientHello {
		return ch, ErrNotClientHello
	}
	if len(b) < 5+recLen {
		return ch, ErrNeedMore
	}
	msg := b[5 : 5+recLen]
	if msg[0] != 1 { // handshake type client_hello
		return ch, ErrNotClientHello
	}
	hsLen := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
	if hsLen > len(msg)-4 {
		return ch, ErrNotClientHello // fragmented across records
	}
	r := reader(msg[4 : 4+hsLen])
	if !r.skip(2+32) || // legacy_version, random
		!r.skipVec8() || // session id
		!r.skipVec16() || // cipher suites
		!r.skipVec8() { // compression methods
		return ch, ErrNotClientHello
	}
	if len(r) == 0 {
		return ch, nil // no extensions
	}
	exts, ok := r.vec16()
	if !ok {
		return ch, ErrNotClientHello
	}
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		data, ok2 := exts.vec16()
		if !ok1 || !ok2 {
			return ch, ErrNotClientHello
		}
		switch typ {
		case 0: // server_name
			list, ok := data.vec16()
			if !ok {
				return ch, ErrNotClientHello
			}
			for len(list) > 0 {
				nameType, ok1 := list.u8()
				name, ok2 := list.vec16()
				if !ok1 || !ok2 {
					return ch, ErrNotClientHello
				}
				if nameType == 0 && ch.ServerName == "" {
					ch.ServerName = string(name)
				}
			}
		case 16: // application_layer_protocol_negotiation
			list, ok := data.vec16()
			if !ok {
				return ch, ErrNotClientHello
			}
			for len(list) > 0 {
				proto, ok := list.vec8()
				if !ok || len(proto) == 0 {
					return ch, ErrNotClientHello
				}
				ch.ALPN = append(ch.ALPN, string(proto))
			}
		}
	}
	return ch, nil
}

// reader is a cursor over TLS wire encoding.
type reader []byte

func (r *reader) skip(n int) bool {
	if len(*r) < n {
		return false
	}
	*r = (*r)[n:]
	return true
}

func (r *reader) u8() (byte, bool) {
	if len(*r) < 1 {
		return 0, false
	}
	v := (*r)[0]
	*r = (*r)[1:]
	return v, true
}

func (r *reader) u16() (uint16, bool) {
	if len(*r) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(*r)
	*r = (*r)[2:]
	return v, true
}

func (r *reader) vec8() (reader, bool) {
	n, ok := r.u8()
	if !ok || len(*r) < int(n) {
		return nil, false
	}
	v := (*r)[:n]
	*r = (*r)[n:]
	return v, true
}

func (r *reader) vec16() (reader, bool) {
	n, ok := r.u16()
	if !ok || len(*r) < int(n) {
		return nil, false
	}
	v := (*r)[:n]
	*r = (*r)[n:]
	return v, true
}

func (r *reader) skipVec8() bool  { _, ok := r.vec8(); return ok }
func (r *reader) skipVec16() bool { _, ok := r.vec16(); return ok }

// HTTP2Preface is what a prior-knowledge HTTP/2 client sends first.
const HTTP2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// Kind is the protocol a connection's first bytes show.
type Kind int

// The kinds Classify tells apart.
const (
	Unknown Kind = iota // not decided: read more
	TLS
	HTTP1
	HTTP2
	Other // none of the above: opaque TCP
)

func (k Kind) String() string {
	return [...]string{"unknown", "tls", "http/1", "h2c", "tcp"}[k]
}

// methods are the HTTP/1.x request methods the proxy recognises; a request
// line starts with one of them followed by a space.
var methods = []string{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

// Classify decides what b, the first bytes of a connection, is. It returns
// Unknown while b is a prefix of more than one possibility, so a single
// byte "P" (POST, PUT, PATCH or the HTTP/2 preface) waits for more.
func Classify(b []byte) Kind {
	if len(b) == 0 {
		return Unknown
	}
	if IsTLS(b) {
		if len(b) < 2 {
			return Unknown
		}
		return TLS
	}
	if prefixOf(b, HTTP2Preface) {
		if len(b) >= len(HTTP2Preface) {
			return HTTP2
		}
		return Unknown
	}
	undecided := false
	for _, m := range methods {
		line := m + " "
		if bytes.HasPrefix(b, []byte(line)) {
			return HTTP1
		}
		if prefixOf(b, line) {
			undecided = true
		}
	}
	if undecided {
		return Unknown
	}
	return Other
}

// prefixOf reports whether b (shorter or longer) agrees with s on their
// common length.
func prefixOf(b []byte, s string) bool {
	n := min(len(b), len(s))
	return string(b[:n]) == s[:n]
}
