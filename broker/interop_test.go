package broker_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// The interop tests run the Eclipse Mosquitto command-line clients against
// the broker: a second, independent MQTT implementation on the client side.

// mosquittoClients returns the paths of mosquitto_pub and mosquitto_sub, or
// skips the test loudly when they are missing; under CI (CI set) a missing
// client fails the test instead, since CI installs them.
func mosquittoClients(t *testing.T) (pub, sub string) {
	t.Helper()
	pub, err1 := exec.LookPath("mosquitto_pub")
	sub, err2 := exec.LookPath("mosquitto_sub")
	if err1 != nil || err2 != nil {
		const msg = "MOSQUITTO-CLIENTS NOT INSTALLED: apt-get install mosquitto-clients — the mosquitto interop tests did not run"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return pub, sub
}

// lockedBuffer is a bytes.Buffer safe to read while a process writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// subProc is a running mosquitto_sub.
type subProc struct {
	cmd         *exec.Cmd
	out, stderr lockedBuffer
	done        chan error
	subs        int64 // the broker's subscriptions before it started
}

// mosquittoSub starts mosquitto_sub for count messages on topic, printing
// each as topic|qos|retain|payload (plus |user properties for v5), and
// returns once the broker holds its subscription (its output is block
// buffered, so it cannot tell) unless it may have its messages already
// (retained ones). The caller makes sure no other subscription comes or goes
// meanwhile.
func mosquittoSub(t *testing.T, b *broker.Broker, version, topic string, qos byte, count int) *subProc {
	t.Helper()
	p := startMosquittoSub(t, b, version, topic, qos, count)
	testutil.WaitFor(t, waitCond, func() error {
		if got := b.Stats().Subscriptions; got != p.subs+1 {
			return fmt.Errorf("subscriptions %d, want %d with mosquitto_sub %s's; its stderr: %q", got, p.subs+1, version, p.stderr.String())
		}
		return nil
	})
	return p
}

func startMosquittoSub(t *testing.T, b *broker.Broker, version, topic string, qos byte, count int) *subProc {
	t.Helper()
	_, bin := mosquittoClients(t)
	subs := b.Stats().Subscriptions
	format := "%t|%q|%r|%p"
	if version == "mqttv5" {
		format += "|%P"
	}
	host, port := hostPort(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), waitCond+5*time.Second)
	t.Cleanup(cancel)
	p := &subProc{done: make(chan error, 1), subs: subs}
	p.cmd = exec.CommandContext(ctx, bin, "-V", version, "-h", host, "-p", port, "-t", topic, "-q", fmt.Sprint(qos),
		"-C", fmt.Sprint(count), "-W", fmt.Sprint(int(waitCond/time.Second)), "-F", format)
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-p.done
	})
	return p
}

// lines waits for mosquitto_sub to exit after its messages and returns the
// lines it printed.
func (p *subProc) lines(t *testing.T) []string {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("mosquitto_sub: %v; stdout %q; stderr %q", err, p.out.String(), p.stderr.String())
		}
	case <-time.After(waitCond + 10*time.Second):
		t.Fatalf("mosquitto_sub did not exit; stdout %q", p.out.String())
	}
	return strings.Split(strings.TrimSuffix(p.out.String(), "\n"), "\n")
}

// mosquittoPub runs mosquitto_pub with args and fails the test unless it
// succeeds.
func mosquittoPub(t *testing.T, b *broker.Broker, version string, args ...string) {
	t.Helper()
	bin, _ := mosquittoClients(t)
	host, port := hostPort(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), waitCond)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, append([]string{"-V", version, "-h", host, "-p", port}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_pub %v: %v: %s", args, err, out)
	}
}

func hostPort(t *testing.T, b *broker.Broker) (string, string) {
	addr := b.Addr(broker.ListenerTCP)
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

var mosquittoVersions = []string{"mqttv311", "mqttv5"}

// pahoFor returns the paho protocol opposite to a mosquitto version, so
// every exchange also crosses protocol versions.
func pahoFor(version string) string {
	if version == "mqttv5" {
		return "v3"
	}
	return "v5"
}

// TestMosquittoSubscriber: mosquitto_sub (3.1.1 and 5) receives what a paho
// client publishes at QoS 0, 1 and 2, once and at that QoS.
func TestMosquittoSubscriber(t *testing.T) {
	t.Parallel()
	mosquittoClients(t)
	for _, version := range mosquittoVersions {
		for qos := byte(0); qos <= 2; qos++ {
			t.Run(fmt.Sprintf("%s/qos%d", version, qos), func(t *testing.T) {
				t.Parallel()
				b, _ := startBroker(t, nil)
				sub := mosquittoSub(t, b, version, "interop/m", 2, 2)
				pub := newClient(t, pahoFor(version), b.Addr(broker.ListenerTCP), "paho-pub")
				pub.pub(t, "interop/m", qos, false, []byte("hello mosquitto"))
				pub.pub(t, "interop/m", qos, false, []byte("second"))
				want := []string{fmt.Sprintf("interop/m|%d|0|hello mosquitto", qos), fmt.Sprintf("interop/m|%d|0|second", qos)}
				if version == "mqttv5" {
					want[0], want[1] = want[0]+"|", want[1]+"|"
				}
				if got := sub.lines(t); !reflect.DeepEqual(got, want) {
					t.Errorf("mosquitto_sub printed %q, want %q", got, want)
				}
			})
		}
	}
}

// TestMosquittoPublisher: paho clients (5 and 3.1.1) receive what
// mosquitto_pub publishes at QoS 0, 1 and 2.
func TestMosquittoPublisher(t *testing.T) {
	t.Parallel()
	mosquittoClients(t)
	for _, version := range mosquittoVersions {
		for qos := byte(0); qos <= 2; qos++ {
			t.Run(fmt.Sprintf("%s/qos%d", version, qos), func(t *testing.T) {
				t.Parallel()
				b, _ := startBroker(t, nil)
				sub := newClient(t, pahoFor(version), b.Addr(broker.ListenerTCP), "paho-sub")
				sub.sub(t, "interop/p", 2)
				mosquittoPub(t, b, version, "-q", fmt.Sprint(qos), "-t", "interop/p", "-m", "from mosquitto")
				if m := expectNext(t, sub, "interop/p", []byte("from mosquitto")); m.qos != qos || m.retain {
					t.Errorf("received QoS %d retain %t, want QoS %d, not retained", m.qos, m.retain, qos)
				}
			})
		}
	}
}

// TestMosquittoToMosquitto: mosquitto_pub and mosquitto_sub of different
// protocol versions talk through the broker.
func TestMosquittoToMosquitto(t *testing.T) {
	t.Parallel()
	mosquittoClients(t)
	for _, tc := range []struct{ pub, sub string }{{"mqttv5", "mqttv311"}, {"mqttv311", "mqttv5"}} {
		t.Run(tc.pub+"-to-"+tc.sub, func(t *testing.T) {
			t.Parallel()
			b, _ := startBroker(t, nil)
			sub := mosquittoSub(t, b, tc.sub, "interop/mm/#", 2, 1)
			mosquittoPub(t, b, tc.pub, "-q", "2", "-t", "interop/mm/x", "-m", "m2m")
			want := "interop/mm/x|2|0|m2m"
			if tc.sub == "mqttv5" {
				want += "|"
			}
			if got := sub.lines(t); !reflect.DeepEqual(got, []string{want}) {
				t.Errorf("mosquitto_sub printed %q, want %q", got, want)
			}
		})
	}
}

// TestMosquittoRetained: a message mosquitto_pub retains (-r) reaches later
// mosquitto and paho subscribers with the retain flag; an empty retained
// message (-r -n) clears it.
func TestMosquittoRetained(t *testing.T) {
	t.Parallel()
	mosquittoClients(t)
	b, _ := startBroker(t, nil)
	base := b.Stats().Retained
	mosquittoPub(t, b, "mqttv311", "-r", "-q", "1", "-t", "interop/r", "-m", "kept")
	for _, version := range mosquittoVersions {
		want := "interop/r|1|1|kept"
		if version == "mqttv5" {
			want += "|"
		}
		if got := startMosquittoSub(t, b, version, "interop/r", 1, 1).lines(t); !reflect.DeepEqual(got, []string{want}) {
			t.Errorf("mosquitto_sub %s printed %q, want %q", version, got, want)
		}
	}
	paho := newClient(t, "v5", b.Addr(broker.ListenerTCP), "paho-retained")
	paho.sub(t, "interop/r", 1)
	if m := expectNext(t, paho, "interop/r", []byte("kept")); !m.retain {
		t.Error("paho subscriber: retained message without the retain flag")
	}

	mosquittoPub(t, b, "mqttv5", "-r", "-n", "-t", "interop/r")
	testutil.WaitFor(t, waitCond, func() error {
		if got := b.Stats().Retained - base; got != 0 {
			return fmt.Errorf("retained messages besides $SYS = %d after mosquitto_pub -r -n, want 0", got)
		}
		return nil
	})
}

// TestMosquittoUserProperties: MQTT 5 user properties and content type
// pass between mosquitto and paho in both directions.
func TestMosquittoUserProperties(t *testing.T) {
	t.Parallel()
	mosquittoClients(t)

	t.Run("mosquitto-to-paho", func(t *testing.T) {
		t.Parallel()
		b, _ := startBroker(t, nil)
		addr := b.Addr(broker.ListenerTCP)
		sub := testutil.MustV5(t, addr, "paho-props-sub")
		sub.Sub(t, "interop/props/in", 1)
		mosquittoPub(t, b, "mqttv5", "-q", "1", "-t", "interop/props/in", "-m", "{}",
			"-D", "publish", "user-property", "k", "v", "-D", "publish", "content-type", "application/json")
		m := sub.Next(t, waitMsg)
		if m.Properties == nil || !reflect.DeepEqual(m.Properties.User, paho.UserProperties{{Key: "k", Value: "v"}}) ||
			m.Properties.ContentType != "application/json" {
			t.Errorf("paho received properties %+v, want user property k=v and content type application/json", m.Properties)
		}
	})
	t.Run("paho-to-mosquitto", func(t *testing.T) {
		t.Parallel()
		b, _ := startBroker(t, nil)
		addr := b.Addr(broker.ListenerTCP)
		sub := mosquittoSub(t, b, "mqttv5", "interop/props/out", 1, 1)
		pub := testutil.MustV5(t, addr, "paho-props-pub")
		ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
		defer cancel()
		if _, err := pub.Publish(ctx, &paho.Publish{Topic: "interop/props/out", QoS: 1, Payload: []byte("p"),
			Properties: &paho.PublishProperties{User: paho.UserProperties{{Key: "k", Value: "v"}}}}); err != nil {
			t.Fatal(err)
		}
		if got, want := sub.lines(t), []string{"interop/props/out|1|0|p|k:v"}; !reflect.DeepEqual(got, want) {
			t.Errorf("mosquitto_sub printed %q, want %q", got, want)
		}
	})
}
