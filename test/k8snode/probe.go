package k8snode

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func metav1Time(t time.Time) metav1.Time { return metav1.NewTime(t) }

// probeClient probes from the host, as a kubelet does: across the bridge
// to the pod's address.
var probeClient = &http.Client{
	Transport: &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // a kubelet does not verify probes either
	},
}

// probe runs a container's probes while its process runs: the startup
// probe until it passes (the container has then started), then the
// readiness probe (the container is ready while it passes) and the
// liveness probe (the container is killed when it fails).
func (c *container) probe(ctx context.Context, proc *process) {
	if sp := c.spec.StartupProbe; sp != nil {
		started := false
		c.poll(ctx, sp, "Startup", func(ok bool) bool {
			if ok {
				started = true
			} else {
				c.unhealthy(proc, "Startup")
			}
			return true
		})
		if !started {
			return
		}
	}
	c.p.mu.Lock()
	c.started = c.proc == proc
	noReadiness := c.spec.ReadinessProbe == nil
	if noReadiness {
		c.ready = c.started
	}
	c.p.mu.Unlock()
	c.p.kickStatus()
	select {
	case <-c.startedOnce:
	default:
		close(c.startedOnce)
	}
	var wg sync.WaitGroup
	if lp := c.spec.LivenessProbe; lp != nil {
		wg.Go(func() {
			c.poll(ctx, lp, "Liveness", func(ok bool) bool {
				if !ok {
					c.unhealthy(proc, "Liveness")
				}
				return !ok
			})
		})
	}
	if rp := c.spec.ReadinessProbe; rp != nil {
		c.poll(ctx, rp, "Readiness", func(ok bool) bool {
			c.p.mu.Lock()
			changed := c.proc == proc && c.ready != ok
			if changed {
				c.ready = ok
			}
			c.p.mu.Unlock()
			if changed {
				c.p.log.Info("readiness changed", "container", c.spec.Name, "ready", ok)
				c.p.kickStatus()
			}
			return false
		})
	}
	wg.Wait()
}

// unhealthy kills a container whose startup or liveness probe failed, as
// a kubelet does; its restart policy decides what follows.
func (c *container) unhealthy(proc *process, kind string) {
	c.p.mu.Lock()
	obj := c.p.obj
	c.p.mu.Unlock()
	c.p.log.Warn(kind+" probe failed: killing the container", "container", c.spec.Name)
	c.p.n.recorder.Eventf(obj, corev1.EventTypeWarning, "Unhealthy", "%s probe failed: killing container %s", kind, c.spec.Name)
	proc.signal(syscall.SIGKILL)
}

// poll runs a probe every period, after its initial delay, and calls
// result with its outcome once it is settled (successThreshold successes
// or failureThreshold failures in a row), until result returns true or
// ctx ends.
func (c *container) poll(ctx context.Context, pr *corev1.Probe, kind string, result func(ok bool) bool) {
	period := seconds(pr.PeriodSeconds, 10)
	success, failure := int(orDefault(pr.SuccessThreshold, 1)), int(orDefault(pr.FailureThreshold, 3))
	if pr.InitialDelaySeconds > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(pr.InitialDelaySeconds) * time.Second):
		}
	}
	t := time.NewTicker(period)
	defer t.Stop()
	okRun, failRun := 0, 0
	var lastErr string
	for {
		err := c.p.probeOnce(ctx, pr, &c.spec)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			okRun, failRun = okRun+1, 0
			if okRun >= success && result(true) {
				return
			}
		} else {
			okRun, failRun = 0, failRun+1
			if err.Error() != lastErr {
				c.p.log.Debug(kind+" probe failed", "container", c.spec.Name, "err", err)
				lastErr = err.Error()
			}
			if failRun >= failure {
				failRun = 0
				if result(false) {
					return
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func seconds(s int32, def int32) time.Duration {
	if s <= 0 {
		s = def
	}
	return time.Duration(s) * time.Second
}

func orDefault(v, def int32) int32 {
	if v <= 0 {
		return def
	}
	return v
}

// probeOnce runs a probe once; nil is success.
func (p *pod) probeOnce(ctx context.Context, pr *corev1.Probe, c *corev1.Container) error {
	ctx, cancel := context.WithTimeout(ctx, seconds(pr.TimeoutSeconds, 1))
	defer cancel()
	ip, ok := p.addr()
	if !ok {
		return errors.New("the pod has no address")
	}
	switch {
	case pr.HTTPGet != nil:
		g := pr.HTTPGet
		port, err := probePort(g.Port, c)
		if err != nil {
			return err
		}
		host := g.Host
		if host == "" {
			host = ip.String()
		}
		scheme := "http"
		if g.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		path := g.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "kube-probe/1.34")
		for _, h := range g.HTTPHeaders {
			req.Header.Add(h.Name, h.Value)
		}
		resp, err := probeClient.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe failed with status %s", resp.Status)
		}
		return nil
	case pr.TCPSocket != nil:
		port, err := probePort(pr.TCPSocket.Port, c)
		if err != nil {
			return err
		}
		host := pr.TCPSocket.Host
		if host == "" {
			host = ip.String()
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case pr.Exec != nil:
		cmd, err := p.command(ctx, c.Name, pr.Exec.Command)
		if err != nil {
			return err
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("exec probe: %v: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	return errors.New("only httpGet, tcpSocket and exec probes are supported by k8snode")
}

// probePort resolves a probe's port, a number or the name of a port of the
// container.
func probePort(port intstr.IntOrString, c *corev1.Container) (int, error) {
	if port.Type == intstr.Int {
		return int(port.IntVal), nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(port.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("probe port %q: the container has no port of that name", port.StrVal)
}
