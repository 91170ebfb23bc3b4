// SPDX-License-Identifier: MIT
// rtm patch 86: the parker's epoll instance. See rtm_park.go, PATCHES.md.

//go:build linux

package mqtt

import (
	"syscall"
)

// parkerSys is the parker's epoll instance and the pipe that wakes its
// loop to stop.
type parkerSys struct {
	epfd   int
	wr, rd int // the wake pipe
	evs    [128]syscall.EpollEvent
}

// start creates the epoll instance and starts the parker's loop.
func (p *parker) start() error {
	s := &p.sys
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		_ = syscall.Close(epfd)
		return err
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN} // id 0: the wake pipe
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fds[0], &ev); err != nil {
		_ = syscall.Close(epfd)
		_ = syscall.Close(fds[0])
		_ = syscall.Close(fds[1])
		return err
	}
	s.epfd, s.rd, s.wr = epfd, fds[0], fds[1]
	go p.loop()
	return nil
}

// add registers fd, readable or hung up, once (EPOLLONESHOT), under id.
func (s *parkerSys) add(fd int, id uint64) error {
	ev := syscall.EpollEvent{
		Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		// the event's 64-bit data is Fd and Pad on every linux arch
		Fd:  int32(uint32(id)),
		Pad: int32(uint32(id >> 32)),
	}
	return syscall.EpollCtl(s.epfd, syscall.EPOLL_CTL_ADD, fd, &ev)
}

// del unregisters fd (a woken connection may be parked again later).
func (s *parkerSys) del(fd int) {
	_ = syscall.EpollCtl(s.epfd, syscall.EPOLL_CTL_DEL, fd, nil)
}

// wait blocks for events and appends their ids; stop is true once the wake
// pipe is readable. Only the loop calls it.
func (s *parkerSys) wait(ids []uint64) ([]uint64, bool) {
	n, err := syscall.EpollWait(s.epfd, s.evs[:], -1)
	if err != nil {
		return ids, false // EINTR; nothing else is expected of a valid epfd
	}
	stop := false
	for _, ev := range s.evs[:n] {
		id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
		if id == 0 {
			stop = true
			continue
		}
		ids = append(ids, id)
	}
	return ids, stop
}

// stop wakes the loop, which then releases the descriptors.
func (s *parkerSys) stop() {
	_, _ = syscall.Write(s.wr, []byte{1})
}

// release closes the descriptors; called by the loop, under the parker's lock.
func (s *parkerSys) release() {
	_ = syscall.Close(s.epfd)
	_ = syscall.Close(s.rd)
	_ = syscall.Close(s.wr)
}
