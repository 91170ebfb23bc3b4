// Command baremochi is the floor of rtm's own overhead in `make bench`: a
// mochi-mqtt v2.7.9 server with an allow-all hook and nothing else, no rtm
// hook, store, cluster or flow control of rtm's broker package.
//
// It is built from the mochi this module uses, which go.mod replaces with
// rtm's fork in third_party/mochi: upstream v2.7.9 plus the patches listed
// in third_party/mochi/PATCHES.md (most are fixes to the server core, so
// this is "mochi as rtm ships it, without rtm"), not a pristine upstream
// build.
//
//	go run ./bench/baremochi -addr 127.0.0.1:1883
//
// It prints "listening ADDR" on standard output once it accepts, and stops
// on SIGINT or SIGTERM.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:1883", "MQTT over TCP listen address")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s := mqtt.New(&mqtt.Options{Logger: log})
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		fmt.Fprintln(os.Stderr, "baremochi:", err)
		os.Exit(1)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "tcp", Address: *addr})
	if err := s.AddListener(tcp); err != nil {
		fmt.Fprintln(os.Stderr, "baremochi:", err)
		os.Exit(1)
	}
	if err := s.Serve(); err != nil {
		fmt.Fprintln(os.Stderr, "baremochi:", err)
		os.Exit(1)
	}
	fmt.Printf("listening %s\n", tcp.Address())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = s.Close()
}
