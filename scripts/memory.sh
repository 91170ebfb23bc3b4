#!/usr/bin/env bash
# Measure a broker's resident memory per idle MQTT connection: `rtm dev`
# and, for comparison, plain Mosquitto.
#
#   scripts/memory.sh            # rtm and mosquitto, 3 runs each, 10000 connections
#   scripts/memory.sh rtm        # only rtm;  scripts/memory.sh mosquitto: only mosquitto
#   MEM_RTM=broker scripts/memory.sh rtm   # `rtm broker` (anonymous devices, no gossip) instead of `rtm dev`
#
# One run: start the broker fresh (free port on 127.0.0.1, fresh temp data
# directory), wait MEM_IDLE seconds, read VmRSS from /proc/PID/status (idle);
# open MEM_N idle MQTT 3.1.1 connections with bench/memory (clean session,
# keepalive 300, MEM_CONC at a time), wait MEM_SETTLE seconds, read VmRSS
# again (loaded). For rtm the Go runtime is also sampled through the admin
# port (/v1/stats goroutines, /metrics go_memstats_*), and, with MEM_GC_WAIT
# > 0, the script waits (at most MEM_GC_WAIT s) for the runtime's next GC
# after settling and samples RSS a third time (rss-steady: the heap of an
# idle rtm grows with per-second housekeeping garbage up to the GC goal, and
# RSS keeps that high-water mark; the figure depends on when that GC comes).
# Per connection = (loaded - idle) / MEM_N, in KiB. The load process and the
# broker are stopped by PID; medians over MEM_RUNS runs are printed last.
# A full run (both brokers) takes about 10 minutes.
#
# rtm parks a connection idle for 5 s (no goroutine) and returns the heap's
# free pages to the OS 10-15 s after a storm of connects ends
# (docs/broker.md, "Memory per connection"): with MEM_SETTLE=20 the loaded
# sample comes after that release, with the default 10 it may come before.
#
# Environment: MEM_N (10000), MEM_RUNS (3), MEM_CONC (50), MEM_IDLE (10),
# MEM_SETTLE (10), MEM_GC_WAIT (180; 0 skips the steady sample),
# RTM_BIN (<repo>/bin/rtm), MEM_RTM (dev; or broker), MOSQUITTO (mosquitto),
# MEM_LOG_DIR (keep logs).
# Needs a hard open-file limit (ulimit -Hn) of at least MEM_N + 100: the
# load process and the broker each hold MEM_N sockets.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHICH=${1:-both}
case $WHICH in rtm | mosquitto | both) ;; *) echo "usage: $0 [rtm|mosquitto|both]" >&2; exit 2 ;; esac
N=${MEM_N:-10000}
RUNS=${MEM_RUNS:-3}
CONC=${MEM_CONC:-50}
IDLE=${MEM_IDLE:-10}
SETTLE=${MEM_SETTLE:-10}
GC_WAIT=${MEM_GC_WAIT:-180}
RTM_BIN=${RTM_BIN:-$REPO/bin/rtm}
RTM_MODE=${MEM_RTM:-dev}
case $RTM_MODE in dev | broker) ;; *) echo "MEM_RTM must be dev or broker" >&2; exit 2 ;; esac
MOSQUITTO=${MOSQUITTO:-mosquitto}
HOLD=$((IDLE + SETTLE + GC_WAIT + 300)) # the loader is stopped long before; this only bounds it

HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt $((N + 100)) ]; then
	echo "hard open-file limit $HARD is too low for MEM_N=$N" >&2
	exit 2
fi
ulimit -n "$HARD" 2>/dev/null # inherited by the brokers; the loader raises its own

WORK=$(mktemp -d /tmp/rtm-memory.XXXXXX)
LOGS=${MEM_LOG_DIR:-$WORK/logs}
mkdir -p "$LOGS"
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null
		for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	PIDS=()
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# stop PID: TERM, wait up to 20 s, then KILL; only processes this script started.
stop() {
	local p=$1
	kill -TERM "$p" 2>/dev/null
	for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
	kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
	wait "$p" 2>/dev/null
	local q=() x
	for x in "${PIDS[@]}"; do [ "$x" = "$p" ] || q+=("$x"); done
	PIDS=("${q[@]}")
}

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
metric() { curl -sf "$ADM/metrics" | awk -v m="$1" '$1==m{printf "%.0f\n", $2}'; }
# The admin key the rtm dev below runs with (/v1 needs it).
ADMIN_KEY=memory-script-admin-key
stat_field() { curl -sf -H "Authorization: Bearer $ADMIN_KEY" "$ADM/v1/stats" | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }
per_conn() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN{printf "%.2f\n", (b-a)/n}'; }

# load ADDR LOG: start bench/memory, wait until every connection is open.
load() {
	"$WORK/memload" -addr "$1" -n "$N" -c "$CONC" -hold "${HOLD}s" >"$2" 2>&1 &
	LOADER=$!
	PIDS+=("$LOADER")
	for _ in $(seq 600); do
		grep -q '^connected' "$2" && break
		kill -0 "$LOADER" 2>/dev/null || break
		sleep 0.2
	done
	if ! grep -q "^connected $N/$N " "$2"; then
		echo "load did not open all connections:" >&2
		cat "$2" >&2
		return 1
	fi
	grep '^connected' "$2"
}

echo "building bench/memory"
(cd "$REPO" && go build -o "$WORK/memload" ./bench/memory) || exit 2

RESULTS=$WORK/results
: >"$RESULTS"

run_rtm() {
	local i=$1 data="$WORK/rtm-data-$1" log="$LOGS/rtm-$1.log"
	mkdir -p "$data"
	if [ "$RTM_MODE" = broker ]; then
		# One broker node as deployed alone: its embedded store in the
		# process, no gossip; anonymous devices, as bench/memory sends no token.
		RTM_BROKER_ADMIN_KEYS=$ADMIN_KEY \
			"$RTM_BIN" broker --data "$data" --auth-devices anonymous --gossip-addr "" --mqtt-addr 127.0.0.1:0 \
			--ws-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --link-addr 127.0.0.1:0 --log-level info >"$log" 2>&1 &
	else
		RTM_ROUTER_ADDR=127.0.0.1:0 RTM_PUSHAPI_ADDR=127.0.0.1:0 RTM_BROKER_ADMIN_KEYS=$ADMIN_KEY \
			"$RTM_BIN" dev --data "$data" --mqtt-addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 \
			--admin-addr 127.0.0.1:0 --gossip-addr 127.0.0.1:0 --link-addr 127.0.0.1:0 --log-level warn >"$log" 2>&1 &
	fi
	local pid=$!
	PIDS+=("$pid")
	ADM="" MQTT=""
	for _ in $(seq 150); do
		if [ "$RTM_MODE" = broker ]; then # its "broker started" log line names the listeners
			MQTT=$(grep -o 'listeners="map\[[^]]*' "$log" | grep -o 'tcp:127\.0\.0\.1:[0-9]*' | head -1 | sed 's#tcp:##')
			ADM=$(grep -o 'listeners="map\[[^]]*' "$log" | grep -o 'admin:127\.0\.0\.1:[0-9]*' | head -1 | sed 's#admin:#http://#')
		else
			MQTT=$(grep -o 'mqtt://127\.0\.0\.1:[0-9]*' "$log" | head -1 | sed 's#mqtt://##')
			ADM=$(grep -o 'http://127\.0\.0\.1:[0-9]*/healthz' "$log" | head -1 | sed 's#/healthz##')
		fi
		[ -n "$MQTT" ] && [ -n "$ADM" ] && break
		sleep 0.2
	done
	[ -n "$MQTT" ] || { echo "rtm $RTM_MODE did not start:" >&2; cat "$log" >&2; return 1; }
	sleep "$IDLE"
	local r0 g0 h0 s0
	r0=$(rss_kib "$pid") g0=$(stat_field goroutines)
	h0=$(metric go_memstats_heap_inuse_bytes) s0=$(metric go_memstats_stack_inuse_bytes)
	load "$MQTT" "$LOGS/load-rtm-$i.log" || return 1
	sleep "$SETTLE"
	local r1 g1 h1 s1 c1
	r1=$(rss_kib "$pid") g1=$(stat_field goroutines) c1=$(stat_field connections)
	h1=$(metric go_memstats_heap_inuse_bytes) s1=$(metric go_memstats_stack_inuse_bytes)
	printf 'rtm run %d: connections %s; RSS idle %s KiB, loaded %s KiB -> %s KiB/conn; goroutines %s -> %s (%s/conn); heap_inuse +%s KiB/conn, stack_inuse +%s KiB/conn\n' \
		"$i" "$c1" "$r0" "$r1" "$(per_conn "$r0" "$r1")" "$g0" "$g1" "$(per_conn "$g0" "$g1")" \
		"$(per_conn $((h0 / 1024)) $((h1 / 1024)))" "$(per_conn $((s0 / 1024)) $((s1 / 1024)))"
	echo "rtm rss $(per_conn "$r0" "$r1")" >>"$RESULTS"
	echo "rtm heap $(per_conn $((h0 / 1024)) $((h1 / 1024)))" >>"$RESULTS"
	echo "rtm stack $(per_conn $((s0 / 1024)) $((s1 / 1024)))" >>"$RESULTS"
	echo "rtm goroutines $(per_conn "$g0" "$g1")" >>"$RESULTS"
	if [ "$GC_WAIT" -gt 0 ]; then
		# Steady state: mochi's once-a-second housekeeping copies the whole
		# client map (Clients.GetAll), so an idle broker allocates garbage
		# in proportion to its connections and the heap grows to the GC
		# goal (2x live with GOGC=100) before each collection. RSS keeps that
		# high-water mark; sample it once the next GC after settling is done.
		local t gc0 gc
		gc0=$(metric go_gc_duration_seconds_count)
		for ((t = 0; t < GC_WAIT; t++)); do
			gc=$(metric go_gc_duration_seconds_count)
			[ "${gc:-0}" -gt "${gc0:-0}" ] && break
			sleep 1
		done
		sleep 2
		local r2 h2 s2
		r2=$(rss_kib "$pid") h2=$(metric go_memstats_heap_inuse_bytes) s2=$(metric go_memstats_stack_inuse_bytes)
		printf 'rtm run %d: steady (next GC came %ss after settling; GCs %s -> %s): RSS %s KiB -> %s KiB/conn; heap_inuse +%s KiB/conn, stack_inuse +%s KiB/conn\n' \
			"$i" "$t" "$gc0" "$gc" "$r2" "$(per_conn "$r0" "$r2")" "$(per_conn $((h0 / 1024)) $((h2 / 1024)))" "$(per_conn $((s0 / 1024)) $((s2 / 1024)))"
		echo "rtm rss-steady $(per_conn "$r0" "$r2")" >>"$RESULTS"
	fi
	stop "$LOADER"
	stop "$pid"
}

run_mosquitto() {
	local i=$1 port conf="$WORK/mosquitto-$1.conf" log="$LOGS/mosquitto-$1.log"
	port=$(free_port)
	cat >"$conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest stderr
log_type error
log_type warning
EOF
	chmod a+r "$conf"
	bash -c "ulimit -n $((N + 1000)); exec $MOSQUITTO -c $conf" >"$log" 2>&1 &
	local pid=$!
	PIDS+=("$pid")
	local up=""
	for _ in $(seq 50); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
		sleep 0.2
	done
	[ -n "$up" ] || { echo "mosquitto did not start:" >&2; cat "$log" >&2; return 1; }
	sleep "$IDLE"
	local r0 r1
	r0=$(rss_kib "$pid")
	load "127.0.0.1:$port" "$LOGS/load-mosquitto-$i.log" || return 1
	sleep "$SETTLE"
	r1=$(rss_kib "$pid")
	printf 'mosquitto run %d: RSS idle %s KiB, loaded %s KiB -> %s KiB/conn\n' "$i" "$r0" "$r1" "$(per_conn "$r0" "$r1")"
	echo "mosquitto rss $(per_conn "$r0" "$r1")" >>"$RESULTS"
	stop "$LOADER"
	stop "$pid"
}

if [ "$WHICH" != mosquitto ]; then
	[ -x "$RTM_BIN" ] || (cd "$REPO" && make build) || exit 2
	echo "rtm $RTM_MODE: $("$RTM_BIN" version 2>/dev/null | head -1), N=$N, idle ${IDLE}s, settle ${SETTLE}s"
	for i in $(seq "$RUNS"); do run_rtm "$i" || exit 1; done
fi
if [ "$WHICH" != rtm ]; then
	command -v "$MOSQUITTO" >/dev/null || { echo "mosquitto not installed (apt-get install mosquitto)" >&2; exit 2; }
	echo "mosquitto: $("$MOSQUITTO" -h 2>&1 | head -1), N=$N, idle ${IDLE}s, settle ${SETTLE}s"
	for i in $(seq "$RUNS"); do run_mosquitto "$i" || exit 1; done
fi

echo
echo "== medians over $RUNS runs (KiB per connection; goroutines per connection)"
awk '{print $1 " " $2}' "$RESULTS" | sort -u | while read -r b m; do
	printf '%-10s %-11s %s\n' "$b" "$m" "$(awk -v b="$b" -v m="$m" '$1==b && $2==m {print $3}' "$RESULTS" | median)"
done
[ -z "${MEM_LOG_DIR:-}" ] || echo "logs in $LOGS"
