package discovery

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/proxy"
)

// Tapper runs live taps: *proxy.Proxy.
type Tapper interface {
	StartTap(id uint64, f proxy.TapFilter)
	StopTap(id uint64)
	StopTaps()
	TapEvents() <-chan proxy.TapEvent
}

// tap keeps the session's Tap stream: it starts and stops the taps the
// control plane asks for and sends their events, until ctx ends or the
// stream fails. Taps end with it: nobody is left to read them.
func (c *Client) tap(ctx context.Context, conn grpc.ClientConnInterface) {
	t := c.cfg.Tapper
	defer t.StopTaps()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream, and so its receiving goroutine
	stream, err := discoveryv1.NewDiscoveryClient(conn).Tap(ctx)
	if err == nil {
		err = stream.Send(&discoveryv1.TapMessage{Message: &discoveryv1.TapMessage_Hello{Hello: &discoveryv1.TapHello{Workload: c.cfg.Workload, Instance: c.cfg.Instance}}})
	}
	if err != nil {
		c.tapEnded(ctx, err)
		return
	}
	recvErr := make(chan error, 1)
	received := make(chan struct{})
	// Taps end (StopTaps, deferred first) only once nothing can start one
	// any more: the stream ends, then its receiving goroutine.
	defer func() { cancel(); <-received }()
	go func() {
		defer close(received)
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if req.GetStop() {
				t.StopTap(req.GetId())
				continue
			}
			t.StartTap(req.GetId(), proxy.TapFilter{Method: req.GetMethod(), PathPrefix: req.GetPathPrefix(), MaxPerSecond: int(req.GetMaxPerSecond())})
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case err := <-recvErr:
			c.tapEnded(ctx, err)
			return
		case ev := <-t.TapEvents():
			msg := &discoveryv1.TapEvent{
				TapId: ev.Tap, UnixNanos: ev.Time.UnixNano(), Direction: ev.Direction, Source: ev.Source, Destination: ev.Destination,
				Authority: ev.Authority, Method: ev.Method, Path: ev.Path, Status: uint32(ev.Status),
				LatencyMicros: uint32(min(ev.Latency.Microseconds(), 1<<32-1)), Tls: ev.TLS, Decision: ev.Decision, Policy: ev.Policy,
			}
			if err := stream.Send(&discoveryv1.TapMessage{Message: &discoveryv1.TapMessage_Event{Event: msg}}); err != nil {
				c.tapEnded(ctx, err)
				return
			}
		}
	}
}

func (c *Client) tapEnded(ctx context.Context, err error) {
	if ctx.Err() != nil || errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
		return
	}
	if status.Code(err) == codes.Unimplemented {
		c.cfg.Log.Info("the control plane offers no tap; live taps are off for this session")
		return
	}
	c.cfg.Log.Warn("tap stream ended; live taps are off until the next session", "err", err)
}
