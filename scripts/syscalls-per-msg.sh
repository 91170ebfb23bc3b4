#!/usr/bin/env bash
# syscalls-per-msg.sh: system calls per delivered message of rtm and
# Mosquitto under the same fixed-rate fan-in (10 publishers -> 1 subscriber).
#
# usage: [MOSQ_NODELAY=1] scripts/syscalls-per-msg.sh RTM_BIN [QOS] [RATE]
#   go build -o /tmp/rtm ./cmd/rtm && scripts/syscalls-per-msg.sh /tmp/rtm 0 20000
#
# Starts `rtm broker` (the bench suite's production settings: token auth,
# its ACL, no cluster) and /usr/sbin/mosquitto on free loopback ports, runs
# `rtm bench fanin` for 7 s against each in turn and counts the broker's
# system calls with `perf stat` (tracepoints; needs perf and
# kernel.perf_event_paranoid <= 2 for one's own processes) for 3 s in the
# middle, divided by RATE x 3. EAGAIN reads are the read exits with ret < 0.
# net:net_dev_xmit counts the TCP segments (data and ACKs) the broker's
# threads put on loopback. MOSQ_NODELAY=1 adds a second Mosquitto with
# `set_tcp_nodelay true` (its default leaves Nagle's algorithm on).
# Stops what it started, by PID.
set -u
BIN=$1 Q=${2:-0} RATE=${3:-20000}
W=$(mktemp -d /tmp/rtm-syscalls.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export RTM_AUTH_DEVICES=token RTM_AUTH_TOKEN_KEYS=bench-token-key-0123456789abcdef \
	RTM_AUTH_ACL='deny all secret/#; allow sub $SYS/broker/#; deny pub %c/status/#' \
	RTM_BROKER_ADMIN_KEYS=bench-admin-key-0123456789
P1=$(freeport) P2=$(freeport)
"$BIN" broker --node-name sc --mqtt-addr 127.0.0.1:$P1 --ws-addr "" --admin-addr 127.0.0.1:$(freeport) \
	--data "$W/d" --log-level warn --log-format json --gossip-addr "" >"$W/rtm.log" 2>&1 &
RP=$!
PIDS+=($!)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' $P2 >"$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >"$W/m.log" 2>&1 &
MP=$!
PIDS+=($!)
SYS=(rtm mosquitto)
if [[ ${MOSQ_NODELAY:-} == 1 ]]; then
	P3=$(freeport)
	printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n' $P3 >"$W/mnd.conf"
	/usr/sbin/mosquitto -c "$W/mnd.conf" >"$W/mnd.log" 2>&1 &
	NP=$!
	PIDS+=($!)
	SYS+=(mosquitto-nodelay)
fi
for p in $P1 $P2 ${P3:-}; do
	for _ in $(seq 100); do
		(echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break
		sleep 0.2
	done
done
echo "load before: $(cat /proc/loadavg)"
for s in "${SYS[@]}"; do
	case $s in
	rtm) P=$P1 PID=$RP extra=(--token-key bench-token-key-0123456789abcdef) ;;
	mosquitto) P=$P2 PID=$MP extra=() ;;
	*) P=$P3 PID=$NP extra=() ;;
	esac
	"$BIN" bench fanin -c 10 --qos "$Q" --rate "$RATE" --duration 7s --addr 127.0.0.1:$P --broker-pid $PID "${extra[@]}" \
		--drain 3s --json >"$W/$s.json" 2>/dev/null &
	BP=$!
	sleep 2
	perf stat -x, -p $PID -o "$W/$s.perf" -e raw_syscalls:sys_enter -e syscalls:sys_enter_read \
		-e syscalls:sys_exit_read --filter 'ret < 0' -e syscalls:sys_enter_write -e syscalls:sys_enter_writev -e net:net_dev_xmit \
		-e syscalls:sys_enter_epoll_pwait -e syscalls:sys_enter_epoll_wait -e syscalls:sys_enter_epoll_ctl \
		-e syscalls:sys_enter_futex -e syscalls:sys_enter_nanosleep -e context-switches -e task-clock -- sleep 3
	wait $BP
	python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "QoS", sys.argv[3], "delivered/s %.0f, %.0f per broker CPU-s, p50 %.3f ms" % (d["delivered_per_s"], d["broker"]["msgs_per_cpu_s"], d["latency_ms"]["p50"]))' "$W/$s.json" $s "$Q"
	grep -v '^#' "$W/$s.perf" | awk -F, -v R="$RATE" 'NF>2 && $3!="" {n=$3; if (n=="syscalls:sys_exit_read") n=n" (EAGAIN etc.)"; if (n=="task-clock") printf "  %-44s %10.0f ms, %.2f us per msg\n", n, $1, $1*1000/(R*3); else printf "  %-44s %10d  %.3f per msg\n", n, $1, $1/(R*3)}'
done
echo "load after: $(cat /proc/loadavg)"
