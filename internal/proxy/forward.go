package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// bufPool recycles the 32 KiB buffers of request bodies and TCP relays; a
// fresh buffer per request is what makes a naive Go proxy GC-bound.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

type proxyBufferPool struct{}

func (proxyBufferPool) Get() []byte  { return *bufPool.Get().(*[]byte) }
func (proxyBufferPool) Put(b []byte) { bufPool.Put(&b) }

// forwarders caches one ReverseProxy per (scheme, address, transport): they
// are stateless apart from their configuration, and building one per request
// would allocate for nothing.
var forwarders sync.Map

type forwarderKey struct {
	scheme, addr string
	transport    http.RoundTripper
	what         string
}

// forward sends r to scheme://addr through transport and copies the
// response back; failures become a 502/503 whose body says what failed.
func forward(w http.ResponseWriter, r *http.Request, scheme, addr string, transport http.RoundTripper, logger *slog.Logger, what string) {
	key := forwarderKey{scheme, addr, transport, what}
	v, ok := forwarders.Load(key)
	if !ok {
		v, _ = forwarders.LoadOrStore(key, newForwarder(scheme, addr, transport, logger, func(*http.Request) string { return what }))
	}
	v.(*httputil.ReverseProxy).ServeHTTP(w, r)
}

// newForwarder returns a reverse proxy to scheme://addr through transport
// (which may redirect the request elsewhere, as failover does); an empty
// addr keeps the host the request's URL names (an HTTP proxy request in
// absolute form). what names the request's upstream in error responses.
func newForwarder(scheme, addr string, transport http.RoundTripper, logger *slog.Logger, what func(*http.Request) string) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = scheme
			if addr != "" {
				pr.Out.URL.Host = addr
			}
			pr.Out.Host = pr.In.Host
		},
		Transport:  transport,
		BufferPool: proxyBufferPool{},
		// FlushInterval stays 0: a response with a known length goes out
		// in one write, while streams (no Content-Length, as with gRPC, or
		// server-sent events) are flushed as they come.
		ErrorLog: httpErrorLog(logger),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			code, why := upstreamError(err)
			if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
				// The caller went away. Abort rather than return, or
				// net/http would send whoever is left an empty 200.
				panic(http.ErrAbortHandler)
			}
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(code)
			fmt.Fprintf(w, "trellis: %s unavailable: %s\n", what(r), why)
		},
	}
}

// bodyIdleTimeout is how long a request body may go without sending a byte;
// a body that keeps flowing (an upload, a gRPC stream) is never cut.
const bodyIdleTimeout = time.Minute

// progressBody extends the request's read deadline before every read of
// its body, so a client that starts a body and then stalls (slow-loris on
// the body) is dropped after bodyIdleTimeout instead of holding a stream
// and a connection to the application forever.
type progressBody struct {
	io.ReadCloser
	rc  *http.ResponseController
	eof bool
}

func (b *progressBody) Read(p []byte) (int, error) {
	if b.eof {
		// After the end net/http reads the connection itself (for the next
		// request or to notice the client leaving); a deadline set now
		// would cut the request short while the application works on it.
		return 0, io.EOF
	}
	_ = b.rc.SetReadDeadline(time.Now().Add(bodyIdleTimeout))
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof = true
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// guardBody wraps r's body, if it has one, in a progressBody.
func guardBody(w http.ResponseWriter, r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	r.Body = &progressBody{ReadCloser: r.Body, rc: http.NewResponseController(w)}
}

// upstreamError maps a transport error to a status and a short reason.
func upstreamError(err error) (int, string) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return http.StatusServiceUnavailable, "connection refused (is it running and listening?)"
	case errors.Is(err, errWrongIdentity):
		return http.StatusBadGateway, "the endpoint did not prove the expected identity (secure naming)"
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout, "timed out"
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return http.StatusGatewayTimeout, "timed out"
		}
		return http.StatusBadGateway, err.Error()
	}
}

// statusRecorder remembers the status code for metrics. It forwards
// Flush and Unwrap so streaming and upgrades keep working through it.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// newAppTransports returns the transports to the local application: HTTP/1.1
// with keep-alive, and prior-knowledge h2c for HTTP/2 and gRPC apps.
func newAppTransports(dialer *net.Dialer) (http1, h2c http.RoundTripper) {
	t1 := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
	}
	t2 := &http.Transport{
		DialContext:        dialer.DialContext,
		IdleConnTimeout:    90 * time.Second,
		DisableCompression: true,
		Protocols:          new(http.Protocols),
	}
	t2.Protocols.SetUnencryptedHTTP2(true)
	return t1, t2
}

// relay copies both directions between a and b until both are done, with
// pooled buffers, half-closing so that protocols that signal the end of a
// request by closing their write side keep working.
func (p *Proxy) relay(a, b net.Conn, direction, source, destination, tlsLabel string) {
	defer p.trackUpstream(b)()
	var received, sent interface{ Add(float64) }
	if p.metrics != nil {
		open := p.metrics.open.WithLabelValues(direction, source, destination, tlsLabel)
		open.Inc()
		defer open.Dec()
		received = p.metrics.bytes.WithLabelValues(direction, source, destination, tlsLabel, "received")
		sent = p.metrics.bytes.WithLabelValues(direction, source, destination, tlsLabel, "sent")
	}
	// last is when either direction last carried data: a stream idles out
	// only when both have been silent, so a one-way stream (pub/sub, a log
	// tail) is not half-closed while it flows.
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var wg sync.WaitGroup
	wg.Add(2)
	copyHalf := func(dst, src net.Conn, counter interface{ Add(float64) }) {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		// Hiding dst's ReadFrom makes CopyBuffer use the pooled buffer; a
		// TCPConn's ReadFrom would allocate its own for any source other
		// than a plain socket.
		n, _ := io.CopyBuffer(struct{ io.Writer }{dst}, idleReader{c: src, last: &last}, *bp)
		bufPool.Put(bp)
		if counter != nil {
			counter.Add(float64(n))
		}
		closeWrite(dst)
	}
	go copyHalf(b, a, received)
	copyHalf(a, b, sent)
	wg.Wait()
	a.Close()
	b.Close()
}

// tcpIdleTimeout ends a relayed stream that has carried nothing either way
// for this long, as Istio's default TCP idle timeout does.
const tcpIdleTimeout = time.Hour

// idleReader reads with a deadline tcpIdleTimeout after the stream's last
// activity in either direction. (A connection pool that sends nothing
// either way for an hour reconnects.)
type idleReader struct {
	c    net.Conn
	last *atomic.Int64
}

func (r idleReader) Read(b []byte) (int, error) {
	for {
		_ = r.c.SetReadDeadline(time.Unix(0, r.last.Load()).Add(tcpIdleTimeout))
		n, err := r.c.Read(b)
		if n > 0 {
			r.last.Store(time.Now().UnixNano())
		}
		var ne net.Error
		if n == 0 && errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, r.last.Load())) < tcpIdleTimeout {
			continue // the other direction was active meanwhile
		}
		return n, err
	}
}

// closeWrite half-closes c when it supports it, or closes it.
func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	for c != nil {
		if cw, ok := c.(closeWriter); ok {
			_ = cw.CloseWrite()
			return
		}
		if inner := unwrapConn(c); inner != nil {
			c = inner
			continue
		}
		_ = c.Close()
		return
	}
}

// httpErrorLog routes net/http's internal log lines (TLS handshake noise,
// malformed requests) through slog at debug level.
func httpErrorLog(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}
