// Package obs builds what every rtm role needs to be observed: the slog
// logger from configuration, and a Prometheus registry with the Go runtime
// and process collectors. Roles register their own metrics on the registry
// they are given, never on the global one, so several nodes share a process.
package obs

import (
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// NewLogger returns a logger writing to w at the given level ("debug",
// "info", "warn", "error") in the given format ("text" or "json").
func NewLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch strings.ToLower(format) {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q: want text or json", format)
	}
}

// Discard is a logger that writes nothing, the default of components given
// no logger.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// NewRegistry returns a registry with the Go runtime and process collectors,
// the base of every role's /metrics.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}
