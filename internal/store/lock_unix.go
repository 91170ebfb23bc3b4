//go:build unix

package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// lockFileName is the lock file inside an embedded data directory.
const lockFileName = "rtm.lock"

// dirLock is an exclusive flock on a data directory's lock file. The kernel
// drops it when the process exits, so a crash leaves no stale lock.
type dirLock struct{ f *os.File }

// lockDataDir takes the lock on dir without waiting, and records this
// process's pid in the lock file for the next one's error message.
func lockDataDir(dir string) (*dirLock, error) {
	path := filepath.Join(dir, lockFileName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("store: lock data dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := "another process"
		if b, rerr := os.ReadFile(path); rerr == nil && len(strings.TrimSpace(string(b))) > 0 {
			holder = "pid " + strings.TrimSpace(string(b))
		}
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("store: data dir %s: %w (locked by %s; use store.uri to share one store between processes)", dir, ErrDataDirLocked, holder)
		}
		return nil, fmt.Errorf("store: lock data dir %s: %w", dir, err)
	}
	// Best effort: the pid only improves the error above.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &dirLock{f: f}, nil
}

// release drops the lock. The file stays: removing it would race with a
// process that has opened it and is about to lock it.
func (l *dirLock) release() { _ = l.f.Close() }
