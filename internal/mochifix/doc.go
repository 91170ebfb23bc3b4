// Package mochifix holds live-listener regression tests for rtm's patches to
// the vendored mochi-mqtt broker in third_party/mochi (see
// third_party/mochi/PATCHES.md). It has no non-test code: each test starts a
// real mochi server on 127.0.0.1:0 and talks to it over TCP.
package mochifix
