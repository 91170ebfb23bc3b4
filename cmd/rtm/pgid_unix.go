//go:build unix

package main

import "syscall"

// ownProcessGroup puts a child in a process group of its own, so a Ctrl-C
// in the terminal reaches only `rtm cluster up`, which then stops the
// children in order (a second signal would make them exit at once).
func ownProcessGroup() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }
