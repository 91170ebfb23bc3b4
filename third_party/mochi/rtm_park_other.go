// SPDX-License-Identifier: MIT
// rtm patch 86: parking needs epoll; elsewhere connections keep their
// goroutine. See rtm_park.go.

//go:build !linux

package mqtt

import "errors"

type parkerSys struct{}

func (p *parker) start() error                          { return errors.New("parking needs linux") }
func (s *parkerSys) started() bool                      { return false }
func (s *parkerSys) add(fd int, id uint64) error        { return errors.New("parking needs linux") }
func (s *parkerSys) del(fd int)                         {}
func (s *parkerSys) wait(ids []uint64) ([]uint64, bool) { return ids, true }
func (s *parkerSys) stop()                              {}
func (s *parkerSys) release()                           {}
