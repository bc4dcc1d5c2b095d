package proxy

import (
	"fmt"
	"testing"
)

// TestLogLimiterForgets: causes that name endpoints come and go with
// updates; the limiter must not remember every one it ever saw.
func TestLogLimiterForgets(t *testing.T) {
	l := newLogLimiter(0) // every interval has passed at once
	for i := range 10 * logLimiterPrune {
		if !l.allow(fmt.Sprint("secure-naming/10.0.0.", i)) {
			t.Fatalf("cause %d refused", i)
		}
	}
	if n := len(l.last); n > logLimiterPrune {
		t.Fatalf("the limiter remembers %d causes, want at most %d", n, logLimiterPrune)
	}
	l = newLogLimiter(1 << 62)
	if !l.allow("x") || l.allow("x") {
		t.Fatal("a cause was not limited to one line per interval")
	}
}
