package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestServe(t *testing.T) {
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		t.Run(method, func(t *testing.T) {
			rec := httptest.NewRecorder()
			serve(rec, httptest.NewRequest(method, "/anything", strings.NewReader("ignored")))
			if rec.Code != http.StatusOK {
				t.Errorf("status = %d, want 200", rec.Code)
			}
			if got := rec.Body.String(); got != string(body) {
				t.Errorf("body = %q, want %q", got, body)
			}
			if got := rec.Header().Get("Content-Length"); got != "37" {
				t.Errorf("Content-Length = %q, want 37", got)
			}
		})
	}
}
