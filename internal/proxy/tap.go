package proxy

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// TapFilter selects the requests a tap reports.
type TapFilter struct {
	Method     string // "" for any
	PathPrefix string // "" for any
	// MaxPerSecond bounds the events per second (DefaultTapRate if 0);
	// the rest are dropped, so a tap on a busy proxy cannot flood it.
	MaxPerSecond int
}

// DefaultTapRate is a tap's bound on events per second unless it asks for
// another; MaxTapRate bounds what it may ask for.
const (
	DefaultTapRate = 100
	MaxTapRate     = 1000
)

// TapEvent is one request as a tap reports it: never its headers' values
// or its body, and its path without the query string.
type TapEvent struct {
	Tap         uint64
	Time        time.Time
	Direction   string
	Source      string
	Destination string
	Authority   string
	Method      string
	Path        string
	Status      int
	Latency     time.Duration
	TLS         bool
	Decision    string
	Policy      string
}

// tapHub holds the active taps and passes matching requests to Events.
type tapHub struct {
	active atomic.Bool // fast path: no tap, no work per request
	mu     sync.Mutex
	taps   map[uint64]*tapState
	events chan TapEvent
}

type tapState struct {
	filter TapFilter
	// A token bucket refilled at filter.MaxPerSecond.
	tokens float64
	last   time.Time
}

func newTapHub() *tapHub {
	return &tapHub{taps: map[uint64]*tapState{}, events: make(chan TapEvent, 1024)}
}

// StartTap starts tap id with filter (or replaces its filter).
func (p *Proxy) StartTap(id uint64, f TapFilter) {
	if f.MaxPerSecond <= 0 {
		f.MaxPerSecond = DefaultTapRate
	}
	f.MaxPerSecond = min(f.MaxPerSecond, MaxTapRate)
	h := p.tap
	h.mu.Lock()
	defer h.mu.Unlock()
	h.taps[id] = &tapState{filter: f, tokens: float64(f.MaxPerSecond), last: time.Now()}
	h.active.Store(true)
}

// StopTap ends tap id.
func (p *Proxy) StopTap(id uint64) {
	h := p.tap
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.taps, id)
	h.active.Store(len(h.taps) > 0)
}

// StopTaps ends every tap (the control plane that asked for them is gone).
func (p *Proxy) StopTaps() {
	h := p.tap
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.taps)
	h.active.Store(false)
}

// TapEvents delivers the events of every tap; a reader that falls behind
// loses events, never slows requests.
func (p *Proxy) TapEvents() <-chan TapEvent { return p.tap.events }

// tapped reports whether a tap is active, before building an event.
func (h *tapHub) tapped() bool { return h.active.Load() }

// MaxTapPath bounds the path and authority of an event.
const MaxTapPath = 2048

// publish sends ev to every tap whose filter matches and whose rate allows.
func (h *tapHub) publish(ev TapEvent) {
	if i := strings.IndexByte(ev.Path, '?'); i >= 0 {
		ev.Path = ev.Path[:i]
	}
	ev.Path, ev.Authority = cut(ev.Path, MaxTapPath), cut(ev.Authority, MaxTapPath)
	now := time.Now() // events come in completion order, not ev.Time's
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, t := range h.taps {
		f := t.filter
		if f.Method != "" && !strings.EqualFold(f.Method, ev.Method) || !strings.HasPrefix(ev.Path, f.PathPrefix) {
			continue
		}
		t.tokens = min(float64(f.MaxPerSecond), t.tokens+now.Sub(t.last).Seconds()*float64(f.MaxPerSecond))
		t.last = now
		if t.tokens < 1 {
			continue
		}
		t.tokens--
		ev.Tap = id
		select {
		case h.events <- ev:
		default:
		}
	}
}

func cut(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
