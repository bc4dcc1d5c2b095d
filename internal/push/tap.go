package push

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/trellis-mesh/trellis/api/discovery/v1"
	"github.com/trellis-mesh/trellis/internal/meshid"
)

// Taps: each proxy keeps a Tap stream open beside its discovery stream.
// A user's tap (trellis tap, the dashboard) is sent as a TapRequest to the
// tap streams of every connected proxy of the workload, and the events
// they send back reach that tap only.

// TapFilter selects the requests of a tap.
type TapFilter struct {
	Method, PathPrefix string
	MaxPerSecond       uint32
}

// TapEvent is an event with the instance whose proxy saw it.
type TapEvent struct {
	Instance string
	*discoveryv1.TapEvent
}

// tapStream is one proxy's open Tap stream.
type tapStream struct {
	instance string // namespace/workload/instance
	workload string // namespace/workload
	send     chan *discoveryv1.TapRequest
	done     chan struct{} // closed when the stream's handler returns
	mu       sync.Mutex
	taps     map[uint64]bool // the taps sent to this proxy, still running
}

// taps are the Tap streams and the users' taps.
type taps struct {
	mu      sync.Mutex
	next    uint64
	streams map[*tapStream]struct{}
	// subscribers receive the events of each tap, by tap id.
	subscribers map[uint64]chan TapEvent
}

// tapRegistrationWait bounds how long a Tap stream waits for its proxy's
// registration (the discovery stream opens first, but may be processed
// after).
const tapRegistrationWait = 5 * time.Second

// maxTapField bounds each text of a tap event (proxies cut paths at
// proxy.MaxTapPath).
const maxTapField = 4096

// Tap implements discoveryv1.DiscoveryServer. A tap stream belongs to the
// discovery stream of the same instance on the same connection: it is
// accepted only while that stream owns the instance, and ends with it
// (and so with its certificate).
func (s *Server) Tap(ts discoveryv1.Discovery_TapServer) error {
	ctx := ts.Context()
	chain, peerAddr, err := peerChain(ctx)
	if err != nil {
		return err
	}
	id, err := s.cfg.Verify(chain)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "the client certificate is not a valid SVID of this mesh: %v", err)
	}
	ns, _, err := meshid.Parse(id)
	if err != nil {
		return status.Errorf(codes.PermissionDenied, "%s is not a workload identity", id)
	}
	first, err := recvWithin(ctx, ts, helloTimeout)
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "a tap stream starts with a TapHello")
	}
	key := ns + "/" + hello.GetWorkload() + "/" + hello.GetInstance()
	// The discovery stream registers before it sends the first update,
	// after which the proxy opens this one; allow for a reconnect race.
	var owner *stream
	deadline := time.Now().Add(tapRegistrationWait)
	for {
		s.mu.Lock()
		owner = s.owners[key]
		s.mu.Unlock()
		if owner != nil {
			break
		}
		if time.Now().After(deadline) {
			return status.Errorf(codes.FailedPrecondition, "no discovery stream of instance %s: open it first", key)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.stopping:
			return errStopping
		case <-time.After(50 * time.Millisecond):
		}
	}
	if owner.identity != id || owner.peer != peerAddr {
		return status.Errorf(codes.PermissionDenied, "instance %s is served by another connection's proxy", key)
	}
	st := &tapStream{instance: key, workload: owner.workload.Ref(), send: make(chan *discoveryv1.TapRequest, 16),
		taps: map[uint64]bool{}, done: make(chan struct{})}
	s.tap.add(st)
	defer func() {
		s.tap.remove(st)
		close(st.done)
	}()

	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := ts.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if ev := m.GetEvent(); ev != nil {
				s.tap.deliver(st, ev)
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.stopping:
			return errStopping
		case <-owner.ended:
			return status.Error(codes.Aborted, "the discovery stream of this instance ended")
		case <-owner.replaced:
			return status.Error(codes.Aborted, "a newer connection took over this instance")
		case err := <-recvErr:
			if status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case req := <-st.send:
			if err := ts.Send(req); err != nil {
				return err
			}
		}
	}
}

// recvWithin receives the first message of a tap stream, or fails after d.
func recvWithin(ctx context.Context, ts discoveryv1.Discovery_TapServer, d time.Duration) (*discoveryv1.TapMessage, error) {
	type result struct {
		m   *discoveryv1.TapMessage
		err error
	}
	ch := make(chan result, 1)
	go func() {
		m, err := ts.Recv()
		ch <- result{m, err}
	}()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-time.After(d):
		return nil, status.Errorf(codes.DeadlineExceeded, "no TapHello within %s", d)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (t *taps) add(st *tapStream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.streams == nil {
		t.streams = map[*tapStream]struct{}{}
	}
	t.streams[st] = struct{}{}
}

func (t *taps) remove(st *tapStream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.streams, st)
}

// deliver passes an event of st's proxy to its tap, if st was sent that
// tap and it still runs; a subscriber that falls behind loses events.
func (t *taps) deliver(st *tapStream, ev *discoveryv1.TapEvent) {
	for _, f := range []string{ev.GetSource(), ev.GetDestination(), ev.GetAuthority(), ev.GetMethod(), ev.GetPath(), ev.GetPolicy(), ev.GetDirection(), ev.GetDecision()} {
		if len(f) > maxTapField {
			return // not what a proxy sends; not worth buffering
		}
	}
	st.mu.Lock()
	ok := st.taps[ev.GetTapId()]
	st.mu.Unlock()
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if ch := t.subscribers[ev.GetTapId()]; ch != nil {
		select {
		case ch <- TapEvent{Instance: st.instance, TapEvent: ev}:
		default:
		}
	}
}

// ErrNoTapStream means no connected proxy of the workload has a tap
// stream (none is connected, or they predate taps).
var ErrNoTapStream = errors.New("no connected proxy of the workload can be tapped")

// StartTap taps every connected proxy of workload (namespace/name) and
// returns how many, and the events, until ctx ends; then the proxies are
// told to stop and the channel is closed.
func (s *Server) StartTap(ctx context.Context, workload string, f TapFilter) (<-chan TapEvent, int, error) {
	t := &s.tap
	t.mu.Lock()
	t.next++
	id := t.next
	var targets []*tapStream
	for st := range t.streams {
		if st.workload == workload {
			targets = append(targets, st)
		}
	}
	if len(targets) == 0 {
		t.mu.Unlock()
		return nil, 0, fmt.Errorf("%w: %s", ErrNoTapStream, workload)
	}
	ch := make(chan TapEvent, 256)
	if t.subscribers == nil {
		t.subscribers = map[uint64]chan TapEvent{}
	}
	t.subscribers[id] = ch
	t.mu.Unlock()

	req := &discoveryv1.TapRequest{Id: id, Method: f.Method, PathPrefix: f.PathPrefix, MaxPerSecond: f.MaxPerSecond}
	for _, st := range targets {
		st.mu.Lock()
		st.taps[id] = true
		st.mu.Unlock()
		select {
		case st.send <- req:
		case <-st.done:
		case <-ctx.Done():
		}
	}
	go func() {
		<-ctx.Done()
		stop := &discoveryv1.TapRequest{Id: id, Stop: true}
		for _, st := range targets {
			st.mu.Lock()
			delete(st.taps, id)
			st.mu.Unlock()
			select {
			case st.send <- stop:
			case <-st.done: // gone: its proxy's taps ended with it
			}
		}
		t.mu.Lock()
		delete(t.subscribers, id)
		close(ch)
		t.mu.Unlock()
	}()
	return ch, len(targets), nil
}
