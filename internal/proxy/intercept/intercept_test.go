package intercept

import (
	"net"
	"testing"
)

// Without a REDIRECT rule the original destination is the address the
// client dialled, which is the listener's; the netns end-to-end tests cover
// the redirected case.
func TestUnredirectedConnection(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("tcp4", l.Addr().String())
		if err == nil {
			defer c.Close()
			_, _ = c.Read(make([]byte, 1))
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, redirected, err := Get(c)
	if err != nil {
		t.Fatal(err)
	}
	if redirected {
		t.Fatal("an unredirected connection reported as redirected")
	}
	if got.String() != l.Addr().String() {
		t.Fatalf("Get = %s, want %s", got, l.Addr())
	}
}
