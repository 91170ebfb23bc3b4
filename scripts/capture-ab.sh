#!/usr/bin/env bash
# capture-ab.sh: history capture's cost (publish throughput with capture on
# against off, bench/history -only capture) for two builds of the bench,
# in alternating runs, each pair of runs on a fresh `rtm store` pinned to
# core 1 while the bench (brokers, publishers, history writer) has core 0:
# the setup of BENCHMARKS.md, History, sessions 8-10.
#
# usage: scripts/capture-ab.sh RTM_BIN PAIRS BENCH_A [BENCH_B] [-- bench flags]
#   go build -o /tmp/rtm ./cmd/rtm && go build -o /tmp/benchhist ./bench/history
#   scripts/capture-ab.sh /tmp/rtm 5 /tmp/benchhist                 # one build, 5 runs
#   scripts/capture-ab.sh /tmp/rtm 4 /tmp/bh-old /tmp/bh-new -- -round-stats
#
# Prints, for each run, its start, the load average and the bench's ratio
# line; each run's full output is kept in a directory it names. Stops the
# stores it started, by PID.
set -u
RTM=$1 PAIRS=$2
shift 2
BINS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do BINS+=("$1"); shift; done
[ $# -gt 0 ] && shift
OUT=$(mktemp -d /tmp/rtm-capture-ab.XXXXXX)
SPID=
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "outputs in $OUT"
for p in $(seq 1 "$PAIRS"); do
	port=$(freeport)
	data=$(mktemp -d /tmp/rtm-capture-ab-store.XXXXXX)
	taskset -c 1 "$RTM" store --addr "127.0.0.1:$port" --data "$data" >"$OUT/store-$p.log" 2>&1 &
	SPID=$!
	for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
	order=("${BINS[@]}")
	if [ $((p % 2)) = 0 ] && [ ${#BINS[@]} = 2 ]; then order=("${BINS[1]}" "${BINS[0]}"); fi
	for bin in "${order[@]}"; do
		f="$OUT/pair$p-$(basename "$bin").txt"
		echo "pair $p $(basename "$bin") $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
		taskset -c 0 "$bin" -only capture -rounds 7 -publish 50000 -store-uri "mongodb://127.0.0.1:$port" "$@" >"$f" 2>&1
		echo "  $(grep '^Ratio' "$f" | cut -d';' -f1-2)"
	done
	kill "$SPID"; wait "$SPID" 2>/dev/null; SPID=
	rm -rf "$data"
done
