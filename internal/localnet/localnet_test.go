package localnet

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// requireRoot skips a test that needs network namespaces and iptables on a
// developer machine without root, and fails it in CI, which runs as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test needs root (network namespaces, iptables); CI runs as root")
	}
	t.Skip("needs root: network namespaces and iptables")
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newNetwork creates a network with a unique prefix on a /24 of the
// benchmark range that nothing on this machine uses (a running `trellis up`
// may hold the default 198.18.0.0/16), and closes it when the test ends.
func newNetwork(t *testing.T) *Network {
	t.Helper()
	requireRoot(t)
	if err := Available(); err != nil {
		t.Fatal(err)
	}
	var b [2]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	prefix := "lt" + hex.EncodeToString(b[:])
	for range 50 {
		// A /24 for hosts and the next one for services, anywhere in
		// 198.18.0.0/15.
		x, err := rand.Int(rand.Reader, big.NewInt(256))
		if err != nil {
			t.Fatal(err)
		}
		hi, lo := byte(18+x.Int64()/128), byte(x.Int64()%128*2)
		n, err := Create(Config{
			Prefix:       prefix,
			Subnet:       netip.PrefixFrom(netip.AddrFrom4([4]byte{198, hi, lo, 0}), 24),
			ServiceRange: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, hi, lo + 1, 0}), 24),
			Log:          testLogger(t),
		})
		if errors.Is(err, ErrSubnetInUse) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := n.Close(); err != nil {
				t.Error(err)
			}
		})
		return n
	}
	t.Fatal("no free /24 in 198.18.0.0/15")
	return nil
}

// serverPy listens on the given ports and answers each connection with a
// line naming the server, the port and the connection's original
// destination (SO_ORIGINAL_DST), "-" where nothing rewrote it.
const serverPy = `
import socket, struct, sys, threading
tag = sys.argv[1]
def serve(s, port):
    while True:
        c, _ = s.accept()
        try:
            try:
                p, a = struct.unpack("!2xH4s8x", c.getsockopt(socket.SOL_IP, 80, 16))
                dst = socket.inet_ntoa(a) + ":" + str(p)
            except OSError:
                dst = "-"
            c.sendall(("%s:%d %s\n" % (tag, port, dst)).encode())
        finally:
            c.close()
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    threading.Thread(target=serve, args=(s, int(port)), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
`

// clientPy connects, optionally with the sidecar's socket mark, and prints
// the first line it gets.
const clientPy = `
import socket, sys
s = socket.socket()
if int(sys.argv[3]):
    s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[3]))  # SO_MARK
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.makefile().readline().strip())
`

// waitHostsPy waits until /etc/hosts, as mounted when it started, names
// argv[1], then prints that line.
const waitHostsPy = `
import sys, time
print("waiting", flush=True)
while True:
    for line in open("/etc/hosts"):
        if sys.argv[1] in line.split()[1:]:
            print(line.strip(), flush=True)
            sys.exit(0)
    time.sleep(0.02)
`

// background starts a command in h and returns its output lines once one
// equals ready; the process is killed when the test ends.
func background(t *testing.T, h *Host, ready string, name string, args ...string) <-chan string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, name, args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 100)
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		defer close(lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); pw.Close(); close(exited) }()
	t.Cleanup(func() { cancel(); <-exited; <-scanned })
	if got := nextLine(t, lines, 10*time.Second); got != ready {
		t.Fatalf("%s in %s: got %q, want %q", name, h.Netns, got, ready)
	}
	return lines
}

func nextLine(t *testing.T, lines <-chan string, timeout time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatal("process exited")
		}
		return l
	case <-time.After(timeout):
		t.Fatalf("no output within %s", timeout)
	}
	return ""
}

// dial connects from h to addr:port and returns the line the server sent.
func dial(h *Host, addr netip.Addr, port, mark int) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Command(ctx, "python3", "-c", clientPy, addr.String(), fmt.Sprint(port), fmt.Sprint(mark)).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// eventually retries f until it returns want or the deadline passes: the
// first packets on a link just brought up can be lost.
func eventually(t *testing.T, what, want string, f func() (string, error)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := f()
		if err == nil && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: got %q (%v), want %q", what, got, err, want)
		}
	}
}

func getent(t *testing.T, h *Host, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Command(ctx, "getent", "hosts", name).Output()
	if err != nil {
		t.Fatalf("getent hosts %s in %s: %v", name, h.Netns, err)
	}
	return strings.Join(strings.Fields(string(out)), " ")
}

func mustLeftovers(t *testing.T, prefix string) []string {
	t.Helper()
	left, err := leftovers(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return left
}

func TestNetwork(t *testing.T) {
	requireTool(t, "python3")
	requireTool(t, "getent")
	n := newNetwork(t)
	mac := func() string {
		b, err := os.ReadFile(filepath.Join("/sys/class/net", n.bridge, "address"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	bridgeMAC := mac()
	svc := n.cfg.ServiceRange.Addr().Next().Next().Next().Next().Next().Next().Next().Next().Next().Next() // .10
	ic := &intercept.RuleConfig{InboundPort: 15006, OutboundPort: 15001, ExcludeInboundPorts: []int{15000}}
	a, err := n.AddHost(HostSpec{Name: "checkout-0", Hosts: map[string]netip.Addr{"orders-api.shipping": svc}, Intercept: ic})
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.AddHost(HostSpec{Name: "orders-api-0.shipping"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("A: %s; B: %s; host: %s", a, b, n.HostAddr())
	if got := mac(); got != bridgeMAC {
		t.Errorf("the bridge's MAC changed from %s to %s when hosts joined", bridgeMAC, got)
	}
	if _, err := n.AddHost(HostSpec{Name: "checkout-0"}); err == nil {
		t.Error("a second host with the same name was added")
	}

	// A's sidecar stand-in on its capture ports; B's application.
	background(t, a, "ready", "python3", "-u", "-c", serverPy, "A", "15001", "15006")
	background(t, b, "ready", "python3", "-u", "-c", serverPy, "B", "8080")
	// The control plane stand-in on the host's address.
	l, err := net.Listen("tcp4", netip.AddrPortFrom(n.HostAddr(), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "host\n")
			c.Close()
		}
	}()
	hostPort := l.Addr().(*net.TCPAddr).Port

	t.Run("hosts reach each other by address", func(t *testing.T) {
		// With the sidecar's mark, as the proxy dials its peers.
		eventually(t, "A → B with the bypass mark", "B:8080 -", func() (string, error) {
			return dial(a, b.Addr, 8080, intercept.BypassMark)
		})
		// The other way round arrives at A's inbound capture port.
		eventually(t, "B → A:8080", fmt.Sprintf("A:15006 %s:8080", a.Addr), func() (string, error) {
			return dial(b, a.Addr, 8080, 0)
		})
	})
	t.Run("outbound interception", func(t *testing.T) {
		eventually(t, "A → service VIP", fmt.Sprintf("A:15001 %s:80", svc), func() (string, error) {
			return dial(a, svc, 80, 0)
		})
		eventually(t, "A → B without the mark", fmt.Sprintf("A:15001 %s:8080", b.Addr), func() (string, error) {
			return dial(a, b.Addr, 8080, 0)
		})
	})
	t.Run("host and namespaces reach each other", func(t *testing.T) {
		eventually(t, "root namespace → B", "B:8080 -", func() (string, error) {
			c, err := net.DialTimeout("tcp4", netip.AddrPortFrom(b.Addr, 8080).String(), 3*time.Second)
			if err != nil {
				return "", err
			}
			defer c.Close()
			line, err := bufio.NewReader(c).ReadString('\n')
			return strings.TrimSpace(line), err
		})
		eventually(t, "B → HostAddr", "host", func() (string, error) { return dial(b, n.HostAddr(), hostPort, 0) })
		eventually(t, "A's proxy → HostAddr", "host", func() (string, error) {
			return dial(a, n.HostAddr(), hostPort, intercept.BypassMark)
		})
	})
	t.Run("hosts file", func(t *testing.T) {
		if got, want := getent(t, a, "orders-api.shipping"), svc.String()+" orders-api.shipping"; got != want {
			t.Errorf("getent hosts orders-api.shipping in A = %q, want %q", got, want)
		}
		if got, want := getent(t, a, "checkout-0"), a.Addr.String()+" checkout-0"; got != want {
			t.Errorf("getent hosts checkout-0 in A = %q, want %q", got, want)
		}
		// A process already running sees a service added later.
		lines := background(t, a, "waiting", "python3", "-u", "-c", waitHostsPy, "late.shipping")
		late := svc.Next()
		if err := a.SetHosts(map[string]netip.Addr{"orders-api.shipping": svc, "late.shipping": late}); err != nil {
			t.Fatal(err)
		}
		if got, want := strings.Join(strings.Fields(nextLine(t, lines, 5*time.Second)), " "), late.String()+" late.shipping"; got != want {
			t.Errorf("running process read %q, want %q", got, want)
		}
		if got, want := getent(t, a, "late.shipping"), late.String()+" late.shipping"; got != want {
			t.Errorf("getent hosts late.shipping = %q, want %q", got, want)
		}
		if err := a.SetHosts(map[string]netip.Addr{"bad name": late}); err == nil {
			t.Error("SetHosts accepted a name with a space")
		}
	})
	t.Run("failed AddHost leaves nothing", func(t *testing.T) {
		// The veth's name is taken (by a bridge: the kernel may lack the
		// dummy type), so AddHost fails after creating the namespace and
		// its hosts file.
		n.mu.Lock()
		veth, netns := vethName(n.cfg.Prefix, n.seq+1), netnsName(n.cfg.Prefix, "doomed", n.seq+1)
		want, _ := nextFree(n.cfg.Subnet, n.reserved)
		n.mu.Unlock()
		if err := run("ip", "link", "add", veth, "type", "bridge"); err != nil {
			t.Fatal(err)
		}
		_, err := n.AddHost(HostSpec{Name: "doomed", Intercept: ic})
		if err == nil || !strings.Contains(err.Error(), "ip link add "+veth) {
			t.Fatalf("AddHost with its veth name taken: %v", err)
		}
		t.Log(err)
		if netnsExists(netns) {
			t.Errorf("namespace %s left behind", netns)
		}
		if _, err := os.Stat(filepath.Join(netnsEtcDir, netns)); !os.IsNotExist(err) {
			t.Errorf("/etc/netns/%s left behind: %v", netns, err)
		}
		if err := delLink(veth); err != nil {
			t.Fatal(err)
		}
		h, err := n.AddHost(HostSpec{Name: "doomed"})
		if err != nil {
			t.Fatal(err)
		}
		if h.Addr != want {
			t.Errorf("retry got %s, want the address the failed attempt gave back, %s", h.Addr, want)
		}
		if err := n.RemoveHost(h); err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(mustLeftovers(t, n.cfg.Prefix), func(s string) bool { return strings.Contains(s, h.Netns) || strings.Contains(s, h.veth) }) {
			t.Errorf("RemoveHost left %v", mustLeftovers(t, n.cfg.Prefix))
		}
	})

	// Close removes everything, once the processes in the namespaces are
	// gone (as `trellis up` stops workloads first).
	t.Run("close", func(t *testing.T) {
		// Close runs before the processes' cleanups here, which must not
		// matter: the veths go first, the namespaces die with their last
		// process.
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if left := mustLeftovers(t, n.cfg.Prefix); len(left) > 0 {
			t.Errorf("left after Close: %v", left)
		}
		if err := n.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := n.AddHost(HostSpec{Name: "late"}); err == nil {
			t.Error("AddHost after Close succeeded")
		}
		if err := a.SetHosts(nil); err == nil {
			t.Error("SetHosts after Close succeeded")
		}
	})
}

func TestCleanup(t *testing.T) {
	n := newNetwork(t)
	for _, name := range []string{"orders-0", "orders-1"} {
		if _, err := n.AddHost(HostSpec{Name: name, Intercept: &intercept.RuleConfig{InboundPort: 15006, OutboundPort: 15001}}); err != nil {
			t.Fatal(err)
		}
	}
	if left := mustLeftovers(t, n.cfg.Prefix); len(left) != 7 { // 2 netns, 2 veths, bridge, 2 dirs
		t.Fatalf("before Cleanup: %v", left)
	}
	// As if the process had crashed, and the bridge were gone already:
	// Create sees the other leftovers.
	if err := run("ip", "link", "del", n.bridge); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(Config{Prefix: n.cfg.Prefix, Subnet: netip.MustParsePrefix("198.18.255.0/24")}); !errors.Is(err, ErrPrefixInUse) {
		t.Fatalf("Create over leftovers: %v, want ErrPrefixInUse", err)
	}
	if err := Cleanup(n.cfg.Prefix, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if left := mustLeftovers(t, n.cfg.Prefix); len(left) > 0 {
		t.Errorf("left after Cleanup: %v", left)
	}
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed; scripts/install-deps installs it", name)
		}
		t.Skipf("%s is not installed; run scripts/install-deps", name)
	}
}
