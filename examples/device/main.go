// Command device is the device side of rtm's router, small enough to copy:
// ask the router which broker to use, connect there, subscribe, print what
// arrives, and when the connection ends, connect where the broker pointed
// (an MQTT 5 Server Reference) or ask the router again, after a short
// backoff. A device never keeps a broker address of its own, so a new
// broker takes new devices first and a drained or dead one loses its
// devices to the others.
//
//	go run ./examples/device -router http://127.0.0.1:8090 -id dev1 -topic devices/dev1/inbox
//
// It uses plain MQTT over TCP only; see docs/router.md for the router's API.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

const (
	minBackoff = 500 * time.Millisecond
	maxBackoff = 15 * time.Second
)

func main() {
	routerURL := flag.String("router", "http://127.0.0.1:8090", "base URL of an rtm router")
	id := flag.String("id", "dev1", "MQTT client ID")
	topic := flag.String("topic", "devices/dev1/inbox", "topic filter to subscribe to")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	backoff := minBackoff
	next := "" // a broker named by a Server Reference, tried once
	for ctx.Err() == nil {
		addr := next
		next = ""
		if addr == "" {
			var err error
			if addr, err = ask(ctx, *routerURL, *id); err != nil {
				log.Printf("router: %v", err)
				backoff = pause(ctx, backoff)
				continue
			}
		}
		ref, err := run(ctx, addr, *id, *topic, func() { backoff = minBackoff })
		if ctx.Err() != nil {
			break
		}
		log.Printf("%s: %v", addr, err)
		if ref != "" {
			log.Printf("%s points at %s", addr, ref)
			next = ref
		}
		backoff = pause(ctx, backoff)
	}
	log.Print("stopped")
}

// ask returns the host:port of the broker the router names for this device.
func ask(ctx context.Context, base, id string) (string, error) {
	u := strings.TrimSuffix(base, "/") + "/v1/route?transport=tcp&client_id=" + url.QueryEscape(id)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	client := http.Client{Timeout: 5 * time.Second}
	res, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		var e struct{ Error, Message string } // e.g. 503 no_broker
		_ = json.NewDecoder(res.Body).Decode(&e)
		return "", fmt.Errorf("%s: %s %s", res.Status, e.Error, e.Message)
	}
	var route struct {
		Node, Host, URL string
		Port            int
	}
	if err := json.NewDecoder(res.Body).Decode(&route); err != nil {
		return "", err
	}
	log.Printf("router: use %s (%s)", route.Node, route.URL)
	return net.JoinHostPort(route.Host, strconv.Itoa(route.Port)), nil
}

// run connects to the broker at addr, subscribes and prints messages until
// the connection ends. It returns the broker's Server Reference, if it sent
// one, and why the connection ended.
func run(ctx context.Context, addr, id, topic string, connected func()) (ref string, err error) {
	conn, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	type end struct {
		ref string
		err error
	}
	ended := make(chan end, 2)
	c := paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(r paho.PublishReceived) (bool, error) {
			fmt.Printf("%s %s\n", r.Packet.Topic, r.Packet.Payload)
			return true, nil
		}},
		// The broker is going away (0x8B), evacuating (0x9C) or taking the
		// client ID for a newer connection (0x8E).
		OnServerDisconnect: func(d *paho.Disconnect) {
			e := end{err: fmt.Errorf("server disconnected: reason 0x%02X", d.ReasonCode)}
			if d.Properties != nil {
				e.ref = d.Properties.ServerReference
			}
			select {
			case ended <- e:
			default:
			}
		},
		OnClientError: func(err error) {
			select {
			case ended <- end{err: err}:
			default:
			}
		},
	})
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30})
	if err != nil {
		// A broker at capacity answers 0x9C (use another server) and
		// names one.
		if ca != nil && ca.Properties != nil {
			return serverAddr(ca.Properties.ServerReference), fmt.Errorf("CONNACK 0x%02X: %w", ca.ReasonCode, err)
		}
		return "", err
	}
	connected()
	log.Printf("connected to %s", addr)
	sub := &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}}
	if _, err := c.Subscribe(ctx, sub); err != nil {
		_ = c.Disconnect(&paho.Disconnect{})
		return "", fmt.Errorf("subscribe %s: %w", topic, err)
	}
	log.Printf("subscribed to %s", topic)
	select {
	case <-ctx.Done():
		_ = c.Disconnect(&paho.Disconnect{})
		return "", ctx.Err()
	case e := <-ended:
		if e.err == nil {
			e.err = errors.New("connection lost")
		}
		return serverAddr(e.ref), e.err
	}
}

// serverAddr reads a Server Reference: rtm sends host:port; a URL or a
// space-separated list (other brokers) gives its first host:port.
func serverAddr(ref string) string {
	ref, _, _ = strings.Cut(strings.TrimSpace(ref), " ")
	if u, err := url.Parse(ref); err == nil && u.Host != "" {
		return u.Host
	}
	return ref
}

// pause waits about d (jittered, so devices cut off together do not return
// together) and returns the next, longer backoff.
func pause(ctx context.Context, d time.Duration) time.Duration {
	t := time.NewTimer(d/2 + rand.N(d/2+1))
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	return min(2*d, maxBackoff)
}
