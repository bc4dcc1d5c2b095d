// Package e2e drives the real trellis binary and real TLS peers (openssl)
// end to end. TestMain builds the binary once.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var trellisBin, proxyBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "trellis-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	trellisBin = filepath.Join(dir, "trellis")
	proxyBin = filepath.Join(dir, "trellis-proxy")
	build := exec.Command("go", "build", "-o", dir, "../../cmd/trellis", "../../cmd/trellis-proxy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build trellis:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireTool fails (in CI) or skips (on a developer machine) when a real
// peer the test drives is not installed; scripts/install-deps installs them.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed; scripts/install-deps installs it", name)
		}
		t.Skipf("%s is not installed; run scripts/install-deps", name)
	}
	return path
}

// result is what a finished command printed.
type result struct {
	stdout, stderr string
	err            error
}

// run runs a command to completion with a deadline.
func run(t *testing.T, dir string, stdin string, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return result{stdout: out.String(), stderr: errb.String(), err: err}
}

// trellis runs the trellis binary and fails the test if it fails.
func trellis(t *testing.T, dir string, args ...string) string {
	t.Helper()
	r := run(t, dir, "", trellisBin, args...)
	if r.err != nil {
		t.Fatalf("trellis %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// trellisFails runs the trellis binary, expects it to fail, and returns its stderr.
func trellisFails(t *testing.T, dir string, args ...string) string {
	t.Helper()
	r := run(t, dir, "", trellisBin, args...)
	if r.err == nil {
		t.Fatalf("trellis %s succeeded, want failure\nstdout:\n%s", strings.Join(args, " "), r.stdout)
	}
	return r.stderr
}

// proc is a process started by background; exited is closed when it ends.
type proc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	// ready is the line of output that said it was ready.
	ready string
}

// background starts a long-running process, waits until a line of its
// output contains ready, and stops it when the test ends.
func background(t *testing.T, dir, ready string, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); pw.Close(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		signalled := false
		for sc.Scan() {
			t.Logf("%s: %s", filepath.Base(name), sc.Text())
			if !signalled && strings.Contains(sc.Text(), ready) {
				found <- sc.Text()
				signalled = true
			}
		}
	}()
	var line string
	select {
	case line = <-found:
	case <-exited:
		t.Fatalf("%s exited before printing %q", name, ready)
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not print %q within 20s", name, ready)
	}
	return &proc{cmd: cmd, exited: exited, ready: line}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
