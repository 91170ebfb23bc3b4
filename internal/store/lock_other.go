//go:build !unix

package store

// dirLock is a no-op: this platform has no flock.
type dirLock struct{}

func lockDataDir(string) (*dirLock, error) { return &dirLock{}, nil }

func (*dirLock) release() {}
