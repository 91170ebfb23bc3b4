#!/usr/bin/env bash
# writes-per-message.sh: write(2) calls and CPU of an rtm broker process per
# delivered message, for a fixed number of messages. Both are read from
# /proc (syscw of /proc/PID/io counts write-type syscalls; utime+stime of
# /proc/PID/stat), so the write count does not depend on the machine's load;
# the CPU figure does (indicative only on a shared machine).
#
# usage: scripts/writes-per-message.sh RTM_BIN QOS MESSAGES PUBLISHERS [SUBSCRIBERS]
#   scripts/writes-per-message.sh bin/rtm 1 40000 4 1    # QoS 1 fan-in 4 -> 1
#   scripts/writes-per-message.sh bin/rtm 0 4000 1 10    # QoS 0 fan-out 1 -> 10
#
# Starts `rtm dev` on free loopback ports (fresh data directory, queue and
# inflight limits 65535), SUBSCRIBERS mosquitto_sub clients on bench/#, then
# PUBLISHERS `mosquitto_pub -l` clients (pipelined) sending MESSAGES in all;
# counts from the first publish to the last delivery. Stops what it started,
# by PID. Needs mosquitto-clients.
set -u
BIN=$1 QOS=$2 N=$3 PUBS=$4 SUBS=${5:-1}
W=$(mktemp -d /tmp/rtm-writes.XXXXXX)
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$W"
}
trap cleanup EXIT
RTM_ROUTER_ADDR=127.0.0.1:0 RTM_PUSHAPI_ADDR=127.0.0.1:0 RTM_BROKER_ADMIN_KEYS=writes-per-message-admin-key \
	RTM_BROKER_MAX_QUEUED=65535 RTM_BROKER_MAX_INFLIGHT=65535 \
	"$BIN" dev --data "$W/data" --mqtt-addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
	--gossip-addr 127.0.0.1:0 --link-addr 127.0.0.1:0 --log-level warn >"$W/log" 2>&1 &
P=$!
PIDS+=("$P")
MQTT=""
for _ in $(seq 100); do
	MQTT=$(grep -o 'mqtt://127\.0\.0\.1:[0-9]*' "$W/log" | head -1 | sed 's#mqtt://##')
	[ -n "$MQTT" ] && break
	sleep 0.2
done
[ -n "$MQTT" ] || { echo "rtm dev did not start:" >&2; cat "$W/log" >&2; exit 1; }
HOST=${MQTT%:*} PORT=${MQTT#*:}
sleep 3
SPIDS=()
for s in $(seq "$SUBS"); do
	mosquitto_sub -h "$HOST" -p "$PORT" -q "$QOS" -t 'bench/#' -C "$N" >"$W/sub$s.out" 2>&1 &
	SPIDS+=($!)
	PIDS+=($!)
done
sleep 2
w0=$(awk '/^syscw/{print $2}' "/proc/$P/io") c0=$(awk '{print $14+$15}' "/proc/$P/stat")
for i in $(seq "$PUBS"); do
	seq $((N / PUBS)) | mosquitto_pub -h "$HOST" -p "$PORT" -q "$QOS" -t "bench/$i" -l &
	PIDS+=($!)
done
for sp in "${SPIDS[@]}"; do
	for _ in $(seq 600); do kill -0 "$sp" 2>/dev/null || break; sleep 0.1; done
done
w1=$(awk '/^syscw/{print $2}' "/proc/$P/io") c1=$(awk '{print $14+$15}' "/proc/$P/stat")
got=$(wc -l <"$W/sub1.out")
deliveries=$((got * SUBS))
tick=$(getconf CLK_TCK)
echo "qos=$QOS messages=$N publishers=$PUBS subscribers=$SUBS received_by_first=$got" \
	"write_syscalls_per_delivery=$(awk -v a=$((w1 - w0)) -v b="$deliveries" 'BEGIN{printf "%.3f", a/b}')" \
	"cpu_us_per_delivery=$(awk -v a=$((c1 - c0)) -v b="$deliveries" -v t="$tick" 'BEGIN{printf "%.2f", a*1e6/t/b}')"
