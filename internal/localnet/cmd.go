package localnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// cmdTimeout bounds one ip or iptables command, so that a stuck one (an
// xtables lock held elsewhere) fails the operation instead of hanging it.
const cmdTimeout = 30 * time.Second

// Where iproute2 keeps namespaces and the files `ip netns exec` mounts
// over /etc.
const (
	netnsRunDir = "/var/run/netns"
	netnsEtcDir = "/etc/netns"
)

// output runs a command and returns its stdout; its error names the
// command line and carries its stderr, which is what says what went wrong.
func output(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			return "", fmt.Errorf("%s: %w", strings.Join(args, " "), err)
		}
		return "", fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, msg)
	}
	return stdout.String(), nil
}

func run(args ...string) error {
	_, err := output(args...)
	return err
}

// linkExists looks in sysfs, which shows the links of this process's
// network namespace.
func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

func netnsExists(name string) bool {
	_, err := os.Stat(filepath.Join(netnsRunDir, name))
	return err == nil
}

// delLink deletes a link; one already gone is not an error, which makes
// removal idempotent and lets deleting one end of a veth pair stand for
// both.
func delLink(name string) error {
	if err := run("ip", "link", "del", name); err != nil && linkExists(name) {
		return err
	}
	return nil
}

func delNetns(name string) error {
	if err := run("ip", "netns", "del", name); err != nil && netnsExists(name) {
		return err
	}
	return nil
}

func delEtcDir(netns string) error {
	if err := os.RemoveAll(filepath.Join(netnsEtcDir, netns)); err != nil {
		return fmt.Errorf("remove hosts file: %w", err)
	}
	return nil
}

// hostPrefixes lists the IPv4 routes and addresses of the host's network
// namespace, which a new subnet must not overlap.
func hostPrefixes() ([]netip.Prefix, error) {
	routes, err := output("ip", "-4", "route", "show", "table", "main")
	if err != nil {
		return nil, err
	}
	addrs, err := output("ip", "-o", "-4", "addr", "show")
	if err != nil {
		return nil, err
	}
	return append(parseRoutes(routes), parseAddrs(addrs)...), nil
}

// Cleanup removes what a network with this prefix left behind when its
// process died without Close: namespaces, links (veth host ends, the
// bridge) and /etc/netns dirs. Run it only when no mesh with this prefix
// is running: it cannot tell leftovers from a live network.
func Cleanup(prefix string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := validatePrefix(prefix); err != nil {
		return err
	}
	var errs []error
	netns, err := ownedNetns(prefix)
	errs = append(errs, err)
	for _, ns := range netns {
		log.Info("removing leftover network namespace", "netns", ns)
		errs = append(errs, delNetns(ns))
	}
	// Listed after the namespaces are gone: deleting one takes the veth
	// pairs inside (unless a process still runs in it), but the kernel may
	// not have finished; delLink treats a link gone meanwhile as deleted.
	links, err := ownedLinks(prefix)
	errs = append(errs, err)
	for _, l := range links {
		log.Info("removing leftover link", "link", l)
		errs = append(errs, delLink(l))
	}
	dirs, err := ownedDirs(prefix)
	errs = append(errs, err)
	for _, d := range dirs {
		log.Info("removing leftover namespace config", "dir", d)
		errs = append(errs, os.RemoveAll(d))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("localnet: cleanup %s: %w", prefix, err)
	}
	return nil
}

// leftovers lists everything on the machine named after prefix.
func leftovers(prefix string) ([]string, error) {
	netns, err1 := ownedNetns(prefix)
	links, err2 := ownedLinks(prefix)
	dirs, err3 := ownedDirs(prefix)
	var all []string
	for _, ns := range netns {
		all = append(all, "netns "+ns)
	}
	for _, l := range links {
		all = append(all, "link "+l)
	}
	return append(all, dirs...), errors.Join(err1, err2, err3)
}

func ownedNetns(prefix string) ([]string, error) {
	out, err := output("ip", "netns", "list")
	return ownedNames(prefix, parseNetns(out)), err
}

func ownedLinks(prefix string) ([]string, error) {
	out, err := output("ip", "-o", "link", "show")
	return ownedNames(prefix, parseLinks(out)), err
}

func ownedDirs(prefix string) ([]string, error) {
	return filepath.Glob(filepath.Join(netnsEtcDir, prefix+"-*"))
}

func ownedNames(prefix string, names []string) []string {
	var mine []string
	for _, n := range names {
		if owned(prefix, n) {
			mine = append(mine, n)
		}
	}
	return mine
}
