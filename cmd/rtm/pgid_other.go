//go:build !unix

package main

import "syscall"

// ownProcessGroup: no process groups here; the children share the
// terminal's signals.
func ownProcessGroup() *syscall.SysProcAttr { return nil }
