package config

import "fmt"

// ListenError is an address a role could not listen on, named by the
// configuration key that sets it, so the operator knows what to change: a
// port in use is a configuration problem (exit code 2), not a crash.
type ListenError struct {
	Key  string // e.g. "broker.mqtt_addr"
	Addr string
	Err  error
}

func (e *ListenError) Error() string {
	return fmt.Sprintf("%s: cannot listen on %s: %v", e.Key, e.Addr, e.Err)
}

func (e *ListenError) Unwrap() error { return e.Err }
