package sniff

import (
	"crypto/tls"
	"errors"
	"net"
	"slices"
	"testing"
	"time"
)

// clientHello captures the ClientHello crypto/tls sends for cfg.
func clientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	go func() {
		_ = tls.Client(c2, cfg).Handshake()
		c2.Close()
	}()
	_ = c1.SetReadDeadline(time.Now().Add(5 * time.Second))
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c1.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if _, perr := ParseClientHello(buf); !errors.Is(perr, ErrNeedMore) || err != nil {
			return buf
		}
	}
}

func TestParseClientHelloFromCryptoTLS(t *testing.T) {
	b := clientHello(t, &tls.Config{ServerName: "orders-api.shipping.svc", NextProtos: []string{"trellis-h2", "h2"}, InsecureSkipVerify: true})
	ch, err := ParseClientHello(b)
	if err != nil {
		t.Fatal(err)
	}
	if ch.ServerName != "orders-api.shipping.svc" || !slices.Equal(ch.ALPN, []string{"trellis-h2", "h2"}) {
		t.Fatalf("got %+v", ch)
	}
	// Every strict prefix asks for more; nothing misparses.
	for i := range len(b) {
		if _, err := ParseClientHello(b[:i]); !errors.Is(err, ErrNeedMore) {
			t.Fatalf("prefix of %d bytes: %v, want ErrNeedMore", i, err)
		}
	}
	if k := Classify(b); k != TLS {
		t.Fatalf("Classify = %v", k)
	}
}

func TestParseClientHelloWithoutSNIOrALPN(t *testing.T) {
	ch, err := ParseClientHello(clientHello(t, &tls.Config{InsecureSkipVerify: true}))
	if err != nil || ch.ServerName != "" || len(ch.ALPN) != 0 {
		t.Fatalf("got %+v, %v", ch, err)
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Kind
	}{
		{"", Unknown},
		{"G", Unknown},
		{"GET", Unknown},
		{"GET ", HTTP1},
		{"GET / HTTP/1.1\r\n", HTTP1},
		{"P", Unknown},
		{"PU", Unknown},
		{"PUT /x", HTTP1},
		{"PRI", Unknown},
		{"PRI * HTTP/2.0\r\n", Unknown},
		{HTTP2Preface, HTTP2},
		{"PATCH /x HTTP/1.1", HTTP1},
		{"\x16", Unknown},
		{"\x16\x03\x01", TLS},
		{"\x16\x01", Other},
		{"*1\r\n$4\r\nPING\r\n", Other}, // Redis
		{"GETX", Other},
		{"get / HTTP/1.1", Other},
		{"\x00\x00", Other},
	} {
		if got := Classify([]byte(tc.in)); got != tc.want {
			t.Errorf("Classify(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestParseClientHelloRejectsGarbage(t *testing.T) {
	for _, in := range []string{"GET / HTTP/1.1\r\n", "\x16\x03\x01\x00\x02\x01\x00", "\x16\x03\x01\xff\xff"} {
		if _, err := ParseClientHello([]byte(in)); !errors.Is(err, ErrNotClientHello) {
			t.Errorf("ParseClientHello(%q) = %v, want ErrNotClientHello", in, err)
		}
	}
}

func FuzzParseClientHello(f *testing.F) {
	f.Add(clientHello(f, &tls.Config{ServerName: "a.b", NextProtos: []string{"trellis-tcp"}, InsecureSkipVerify: true}))
	f.Add([]byte("\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ch, err := ParseClientHello(b)
		if err == nil {
			// Deterministic, and a longer buffer never changes the answer.
			again, err2 := ParseClientHello(append(slices.Clone(b), 0, 0, 0))
			if err2 != nil || again.ServerName != ch.ServerName || !slices.Equal(again.ALPN, ch.ALPN) {
				t.Fatalf("trailing bytes changed the result: %+v %v vs %+v", again, err2, ch)
			}
		}
		_ = Classify(b)
	})
}
