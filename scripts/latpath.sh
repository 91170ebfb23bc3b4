#!/usr/bin/env bash
# latpath.sh: the broker's own share of publish-to-delivery latency, rtm
# against Mosquitto, in the latency scenario (QoS 1, 10 pairs at 1,000
# msg/s): the time from the read(2) that returns a PUBLISH to the write(2)
# of its delivery, on the broker thread that handles it.
#
# usage: scripts/latpath.sh RTM_BIN [RTM_BIN2]
#   go build -o /tmp/rtm ./cmd/rtm && scripts/latpath.sh /tmp/rtm
#
# Why this and not only `rtm bench`'s p50: the end-to-end latency adds the
# kernel's wake-ups and the load generator's own scheduling, which a busy
# machine inflates for every system alike; the read-to-write time is the
# broker's code alone, and its median moves little with load. Starts
# `rtm broker` (the bench suite's production settings: token auth, its ACL,
# no cluster) for each RTM_BIN and /usr/sbin/mosquitto on free loopback
# ports, runs `rtm bench pairs` for 6 s against each in turn, and records
# the broker's read/write system calls with `perf record` (tracepoints;
# needs perf and kernel.perf_event_paranoid <= 2 for one's own processes)
# for 2 s in the middle. A delivery is a write(2) of more than 10 bytes
# (not a PUBACK); the tracepoints themselves add ~1-2 us to every figure.
# Stops what it started, by PID.
set -u
BIN=$1
W=$(mktemp -d /tmp/rtm-latpath.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export RTM_AUTH_DEVICES=token RTM_AUTH_TOKEN_KEYS=bench-token-key-0123456789abcdef \
	RTM_AUTH_ACL='deny all secret/#; allow sub $SYS/broker/#; deny pub %c/status/#' \
	RTM_BROKER_ADMIN_KEYS=bench-admin-key-0123456789
SYS=() PORT=() PID=()
i=0
for b in "$@"; do
	P=$(freeport)
	"$b" broker --node-name lp$i --mqtt-addr 127.0.0.1:$P --ws-addr "" --admin-addr 127.0.0.1:$(freeport) \
		--data "$W/d$i" --log-level warn --log-format json --gossip-addr "" >"$W/rtm$i.log" 2>&1 &
	PIDS+=($!) SYS+=("rtm:$b") PORT+=($P) PID+=($!)
	i=$((i + 1))
done
P=$(freeport)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' $P >"$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >"$W/m.log" 2>&1 &
PIDS+=($!) SYS+=(mosquitto) PORT+=($P) PID+=($!)
for p in "${PORT[@]}"; do
	for _ in $(seq 100); do
		(echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break
		sleep 0.2
	done
done
echo "load before: $(cat /proc/loadavg)"
for k in "${!SYS[@]}"; do
	extra=()
	[[ ${SYS[$k]} == rtm:* ]] && extra=(--token-key bench-token-key-0123456789abcdef)
	"$BIN" bench pairs -c 10 --qos 1 --rate 1000 --duration 6s --addr 127.0.0.1:${PORT[$k]} --broker-pid ${PID[$k]} "${extra[@]}" \
		--drain 2s --json >"$W/$k.json" 2>/dev/null &
	BP=$!
	sleep 2
	perf record -q -e syscalls:sys_enter_read -e syscalls:sys_exit_read -e syscalls:sys_enter_write \
		-p ${PID[$k]} -o "$W/$k.perf" -- sleep 2 >/dev/null 2>&1
	wait $BP
	perf script -i "$W/$k.perf" 2>/dev/null | python3 -c '
import json, re, sys
rd, gaps = {}, []
for line in sys.stdin:
    m = re.match(r"\s*\S+\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s*(.*)", line)
    if not m:
        continue
    tid, t, ev, rest = m.group(1), float(m.group(2)), m.group(3), m.group(4)
    if ev.endswith("sys_exit_read"):
        if int(rest, 16 if rest.startswith("0x") else 10) > 10:
            rd[tid] = t
    elif ev.endswith("sys_enter_write"):
        c = int(re.search(r"count: (0x[0-9a-f]+)", rest).group(1), 16)
        if c > 10 and tid in rd:
            gaps.append((t - rd.pop(tid)) * 1e6)
gaps.sort()
q = lambda p: gaps[int(p * (len(gaps) - 1))] if gaps else float("nan")
d = json.load(open(sys.argv[1]))
print("%-40s read->delivery write: n %5d  p25 %5.1f  p50 %5.1f  p90 %5.1f us | bench p50 %.3f p99 %.3f ms, %.0f msg per broker CPU-s" % (
    sys.argv[2][-40:], len(gaps), q(.25), q(.5), q(.9), d["latency_ms"]["p50"], d["latency_ms"]["p99"], d["broker"]["msgs_per_cpu_s"]))
' "$W/$k.json" "${SYS[$k]}"
done
echo "load after: $(cat /proc/loadavg)"
