#!/usr/bin/env bash
# cost-ab.sh: messages per broker CPU-second of two rtm builds, bare mochi
# and Mosquitto in one run, alternating, so a change's effect on the cost per
# message can be read on a shared machine (ratios within one run; the load
# average is printed before and after).
#
# usage: [MOSQ_NODELAY=1] scripts/cost-ab.sh BASE_RTM_BIN NEW_RTM_BIN [ROUNDS] [DURATION]
#   git worktree add /tmp/base <commit> && (cd /tmp/base && go build -o /tmp/rtm-base ./cmd/rtm)
#   go build -o /tmp/rtm-new ./cmd/rtm
#   scripts/cost-ab.sh /tmp/rtm-base /tmp/rtm-new 3 4s
#
# Starts both rtm builds as `rtm broker` with the bench suite's production
# settings (token auth, the suite's ACL, no cluster), bare mochi built from
# this checkout (bench/baremochi) and /usr/sbin/mosquitto, on free loopback
# ports, and runs the suite's four message scenarios (QoS 0 fan-in 10->1 at
# 20,000 msg/s, QoS 1 fan-in at 10,000, QoS 0 fan-out 1->10 unlimited, QoS 1
# 10 pairs at 1,000) with NEW_RTM_BIN's `rtm bench`, order reversed every
# other round. Prints each run, then medians and ratios. Stops what it
# started, by PID. MOSQ_NODELAY=1 adds a second Mosquitto, "mosqnd", with
# `set_tcp_nodelay true` (Mosquitto 2.0's default leaves Nagle's algorithm
# on, so the kernel coalesces its small writes to a subscriber; rtm, like
# any Go program, sets TCP_NODELAY).
set -u
BASE=$1 NEW=$2 R=${3:-3} D=${4:-4s}
W=$(mktemp -d /tmp/rtm-cost-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export RTM_AUTH_DEVICES=token RTM_AUTH_TOKEN_KEYS=bench-token-key-0123456789abcdef \
	RTM_AUTH_ACL='deny all secret/#; allow sub $SYS/broker/#; deny pub %c/status/#' \
	RTM_BROKER_ADMIN_KEYS=bench-admin-key-0123456789
declare -A PORT PID
start_rtm() { # name bin
	PORT[$1]=$(freeport)
	"$2" broker --node-name "$1" --mqtt-addr 127.0.0.1:${PORT[$1]} --ws-addr "" --admin-addr 127.0.0.1:$(freeport) \
		--data "$W/data-$1" --log-level warn --log-format json --gossip-addr "" >"$W/$1.log" 2>&1 &
	PID[$1]=$!
	PIDS+=($!)
}
start_rtm base "$BASE"
start_rtm new "$NEW"
PORT[mosq]=$(freeport)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' "${PORT[mosq]}" >"$W/m.conf"
/usr/sbin/mosquitto -c "$W/m.conf" >"$W/mosq.log" 2>&1 &
PID[mosq]=$!
PIDS+=($!)
(cd "$(dirname "$0")/.." && go build -o "$W/baremochi" ./bench/baremochi) || exit 1
SYSTEMS=(base new mosq mochi)
if [[ ${MOSQ_NODELAY:-} == 1 ]]; then
	PORT[mosqnd]=$(freeport)
	printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n' "${PORT[mosqnd]}" >"$W/mnd.conf"
	/usr/sbin/mosquitto -c "$W/mnd.conf" >"$W/mosqnd.log" 2>&1 &
	PID[mosqnd]=$!
	PIDS+=($!)
	SYSTEMS+=(mosqnd)
fi
PORT[mochi]=$(freeport)
"$W/baremochi" -addr 127.0.0.1:${PORT[mochi]} >"$W/mochi.log" 2>&1 &
PID[mochi]=$!
PIDS+=($!)
for s in "${SYSTEMS[@]}"; do
	for _ in $(seq 100); do
		(echo >/dev/tcp/127.0.0.1/${PORT[$s]}) 2>/dev/null && break
		sleep 0.2
	done
done

SCEN=("fanin -c 10 --qos 0 --rate 20000" "fanin -c 10 --qos 1 --rate 10000" "fanout -c 10 --qos 0" "pairs -c 10 --qos 1 --rate 1000")
KEYS=(fanin0 fanin1 fanout0 lat1)
echo "load before: $(cat /proc/loadavg)"
for r in $(seq 1 "$R"); do
	order=("${SYSTEMS[@]}")
	if ((r % 2 == 0)); then
		order=()
		for ((j = ${#SYSTEMS[@]} - 1; j >= 0; j--)); do order+=("${SYSTEMS[$j]}"); done
	fi
	for i in 0 1 2 3; do
		for s in "${order[@]}"; do
			extra=()
			[[ $s == base || $s == new ]] && extra=(--token-key bench-token-key-0123456789abcdef)
			out="$W/r$r-${KEYS[$i]}-$s.json"
			# shellcheck disable=SC2086
			"$NEW" bench ${SCEN[$i]} --duration "$D" --addr 127.0.0.1:${PORT[$s]} --broker-pid ${PID[$s]} "${extra[@]}" --drain 5s --json >"$out" 2>/dev/null
			python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "per_cpu %.0f delivered/s %.0f lost %d p50 %.3f p99 %.3f" % (d["broker"]["msgs_per_cpu_s"], d["delivered_per_s"], d["lost"], d["latency_ms"]["p50"], d["latency_ms"]["p99"]))' "$out" "$r ${KEYS[$i]} $s"
			sleep 0.3
		done
	done
done
echo "load after: $(cat /proc/loadavg)"
python3 - "$W" <<'PY'
import glob, json, os, statistics as st, sys
res = {}
for f in glob.glob(sys.argv[1] + "/r*.json"):
    _, k, s = os.path.basename(f)[:-5].split("-")
    res.setdefault(k, {}).setdefault(s, []).append(json.load(open(f)))
for k in ["fanin0", "fanin1", "fanout0", "lat1"]:
    med = lambda f: {s: st.median(f(d) for d in v) for s, v in res.get(k, {}).items()}
    m = med(lambda d: d["broker"]["msgs_per_cpu_s"])
    p50 = med(lambda d: d["latency_ms"]["p50"])
    p99 = med(lambda d: d["latency_ms"]["p99"])
    sy = [s for s in ("base", "new", "mochi", "mosq", "mosqnd") if s in m]
    print(k, "per CPU-s:", " ".join("%s=%.0f" % (s, m[s]) for s in sy),
          "| base/mosq %.2f new/mosq %.2f new/base %.2f new/mochi %.2f" % (m["base"] / m["mosq"], m["new"] / m["mosq"], m["new"] / m["base"], m["new"] / m["mochi"]),
          ("| mosqnd/mosq %.2f new/mosqnd %.2f" % (m["mosqnd"] / m["mosq"], m["new"] / m["mosqnd"])) if "mosqnd" in m else "",
          "| p50 ms", " ".join("%s=%.3f" % (s, p50[s]) for s in sy),
          "| p99 ms", " ".join("%s=%.3f" % (s, p99[s]) for s in sy))
PY
