package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/trellis-mesh/trellis/internal/proxy/intercept"
)

// runIntercept is 'trellis-proxy intercept': the init container of an
// injected Kubernetes pod, which installs in the pod's network namespace
// the rules that send its TCP through the sidecar, and exits.
func runIntercept(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("trellis-proxy intercept", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c intercept.RuleConfig
	var exIn, exOut string
	fs.IntVar(&c.InboundPort, "inbound-port", 15006, "the proxy's transparent inbound port")
	fs.IntVar(&c.OutboundPort, "outbound-port", 15001, "the proxy's transparent outbound port")
	fs.IntVar(&c.ProxyUID, "proxy-uid", 0, "the proxy's user, whose connections are not redirected (0: only marked sockets bypass)")
	fs.StringVar(&exIn, "exclude-inbound-ports", "", "comma-separated ports that reach the application without the proxy")
	fs.StringVar(&exOut, "exclude-outbound-ports", "", "comma-separated ports the application reaches without the proxy")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: trellis-proxy intercept [flags]\n\nInstalls the interception rules (iptables and ip6tables) in the current network namespace.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("intercept: unexpected arguments %q", fs.Args())
	}
	var err error
	if c.ExcludeInboundPorts, err = intercept.ParsePorts(exIn); err != nil {
		return fmt.Errorf("--exclude-inbound-ports: %w", err)
	}
	if c.ExcludeOutboundPorts, err = intercept.ParsePorts(exOut); err != nil {
		return fmt.Errorf("--exclude-outbound-ports: %w", err)
	}
	for _, p := range []struct {
		name string
		port int
	}{{"--inbound-port", c.InboundPort}, {"--outbound-port", c.OutboundPort}} {
		if p.port < 1 || p.port > 65535 {
			return fmt.Errorf("%s %d is not a port number", p.name, p.port)
		}
	}
	if c.InboundPort == c.OutboundPort {
		return errors.New("--inbound-port and --outbound-port must differ")
	}
	if c.ProxyUID < 0 {
		return fmt.Errorf("--proxy-uid %d is not a user id", c.ProxyUID)
	}
	if err := intercept.Install(c); err != nil {
		return fmt.Errorf("intercept: %w", err)
	}
	fmt.Fprintf(stderr, "trellis-proxy intercept: TCP redirected to ports %d (inbound) and %d (outbound)\n", c.InboundPort, c.OutboundPort)
	return nil
}
