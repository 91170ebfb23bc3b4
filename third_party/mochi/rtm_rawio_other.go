// SPDX-License-Identifier: MIT

//go:build !linux || race

package mqtt

import "syscall"

// sysRead and sysWrite: see rtm_rawio_linux.go (rtm patch 97).

func sysRead(fd int, p []byte) (int, error) { return syscall.Read(fd, p) }

func sysWrite(fd int, p []byte) (int, error) { return syscall.Write(fd, p) }
