#!/usr/bin/env bash
# Run the Eclipse Paho MQTT interoperability suite (client_test.py for MQTT
# 3.1.1, client_test5.py for MQTT 5) against `rtm dev`, or against one node
# of a 3-node `rtm cluster up`.
#
#   git clone https://github.com/eclipse/paho.mqtt.testing /tmp/paho-testing
#   scripts/paho-interop.sh /tmp/paho-testing/interoperability
#   PAHO_TARGET=cluster scripts/paho-interop.sh /tmp/paho-testing/interoperability
#
# Each suite gets a fresh broker or cluster (free ports on 127.0.0.1, fresh
# temp data directory), stopped by PID afterwards. Prints one summary line
# per suite plus the failing tests, and exits 1 if any test failed or
# errored (2 on a usage or setup error).
#
# The broker runs with the test configuration of testdata/paho/interop.env
# (an ACL rule refusing test/nosubscribe with SUBACK 0x80, keepalive capped
# at 60 s: what the suites assume; the file says why each).
#
# Environment:
#   RTM_BIN          rtm binary (default: <repo>/bin/rtm, built with make build if missing)
#   PYTHON           python 3 interpreter (default: python3); the suite needs only the stdlib
#   PAHO_SUITES      suites to run (default: "client_test.py client_test5.py")
#   PAHO_TARGET      dev (default): a fresh `rtm dev`; cluster: a fresh
#                    `rtm cluster up --brokers 3`, the suite talking to n2
#   PAHO_CONFIG      RTM_* settings file (default: testdata/paho/interop.env;
#                    /dev/null for rtm's defaults)
#   PAHO_TIMEOUT     bound on one suite run in seconds (default: 600)
#   PAHO_ALLOW_FAIL  test names allowed to fail without failing the script,
#                    e.g. "test_subscribe_options" (see the hints below)
#   PAHO_LOG_DIR     keep suite and broker logs here (default: a temp dir, removed)
# Extra arguments after the suite directory are passed to `rtm dev` (not in
# cluster mode); RTM_* environment variables reach the broker(s) too and
# override the settings file (e.g. RTM_BROKER_MAX_INFLIGHT=2).
#
# Why a Python wrapper instead of `python3 client_test.py -h H -p P`: both
# scripts hand sys.argv to unittest.main() unchanged (client_test5.py removes
# only -p), which rejects -p/-h; and their `o in ("--help")` test is a
# substring match, so -h prints usage and exits. The wrapper sets the
# options the scripts understand (--hostname=, -p) and gives unittest its own
# argv. -n/--nosubscribe_topic_filter is accepted by the scripts but never
# used: the denied filter is hard-coded as test/nosubscribe.
set -uo pipefail

usage() { echo "usage: $0 PAHO_INTEROPERABILITY_DIR [rtm dev flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
SUITE=$(cd "$1" 2>/dev/null && pwd) || { echo "no such directory: $1" >&2; exit 2; }
shift
[ -f "$SUITE/client_test.py" ] && [ -d "$SUITE/mqtt" ] || { echo "$SUITE does not look like paho.mqtt.testing/interoperability" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
RTM_BIN=${RTM_BIN:-$REPO/bin/rtm}
PYTHON=${PYTHON:-python3}
PAHO_SUITES=${PAHO_SUITES:-client_test.py client_test5.py}
PAHO_TARGET=${PAHO_TARGET:-dev}
PAHO_CONFIG=${PAHO_CONFIG:-$REPO/testdata/paho/interop.env}
PAHO_TIMEOUT=${PAHO_TIMEOUT:-600}
PAHO_ALLOW_FAIL=${PAHO_ALLOW_FAIL:-}

case $PAHO_TARGET in
dev) ;;
cluster) [ $# -eq 0 ] || { echo "PAHO_TARGET=cluster takes no rtm flags (use RTM_* variables)" >&2; exit 2; } ;;
*) echo "PAHO_TARGET: want dev or cluster, got $PAHO_TARGET" >&2; exit 2 ;;
esac

# The settings file: KEY=VALUE lines exported unless the environment already
# sets KEY. Read line by line, never evaluated.
[ -r "$PAHO_CONFIG" ] || { echo "PAHO_CONFIG: cannot read $PAHO_CONFIG" >&2; exit 2; }
while IFS= read -r line || [ -n "$line" ]; do
	case $line in '' | '#'*) continue ;; esac
	key=${line%%=*}
	[[ $key =~ ^RTM_[A-Z0-9_]+$ && $line == *=* ]] || { echo "$PAHO_CONFIG: not an RTM_KEY=VALUE line: $line" >&2; exit 2; }
	[ -n "${!key+set}" ] || export "$key=${line#*=}"
done <"$PAHO_CONFIG"

if [ ! -x "$RTM_BIN" ]; then
	(cd "$REPO" && make build) >&2 || { echo "build failed" >&2; exit 2; }
fi
command -v "$PYTHON" >/dev/null || { echo "$PYTHON not found" >&2; exit 2; }

WORK=$(mktemp -d /tmp/paho-interop.XXXXXX)
LOGS=${PAHO_LOG_DIR:-$WORK/logs}
mkdir -p "$LOGS"
BROKER_PID=""

stop_broker() {
	[ -n "$BROKER_PID" ] || return 0
	if kill -0 "$BROKER_PID" 2>/dev/null; then
		kill -TERM "$BROKER_PID" 2>/dev/null
		# rtm cluster up stops its children gracefully (up to 20 s a stage)
		for _ in $(seq 300); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.2; done
		kill -0 "$BROKER_PID" 2>/dev/null && kill -KILL "$BROKER_PID" 2>/dev/null
	fi
	wait "$BROKER_PID" 2>/dev/null
	BROKER_PID=""
}
cleanup() {
	stop_broker
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_broker NAME: rtm dev on free loopback ports, or rtm cluster up;
# sets BROKER_PID, PORT.
start_broker() {
	if [ "$PAHO_TARGET" = cluster ]; then
		start_cluster "$1"
		return
	fi
	local data="$WORK/data-$1" log="$LOGS/$1.broker.log"
	shift
	mkdir -p "$data"
	"$RTM_BIN" dev --data "$data" --mqtt-addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 \
		--admin-addr 127.0.0.1:0 "$@" >"$log" 2>&1 &
	BROKER_PID=$!
	PORT=""
	for _ in $(seq 150); do
		PORT=$(grep -o 'mqtt://127\.0\.0\.1:[0-9]*' "$log" | head -1 | sed 's/.*://')
		[ -n "$PORT" ] && return 0
		kill -0 "$BROKER_PID" 2>/dev/null || break
		sleep 0.2
	done
	echo "rtm dev did not start; its log:" >&2
	cat "$log" >&2
	return 1
}

# start_cluster NAME: rtm cluster up --brokers 3 on 17 consecutive loopback
# ports from a random base (it checks them all first; a busy one makes it
# exit, and another base is tried); PORT is n2's MQTT port.
start_cluster() {
	local data="$WORK/cluster-$1" log="$LOGS/$1.cluster.log" base
	for _ in 1 2 3 4 5; do
		rm -rf "$data"
		mkdir -p "$data"
		base=$((20000 + RANDOM % 20000))
		"$RTM_BIN" cluster up --brokers 3 --data "$data" --base-port "$base" >"$log" 2>&1 &
		BROKER_PID=$!
		PORT=""
		for _ in $(seq 600); do # 120 s: three brokers, a store, a router, a push API
			PORT=$(grep -E '^  n2 ' "$log" | grep -o 'mqtt://127\.0\.0\.1:[0-9]*' | head -1 | sed 's/.*://')
			[ -n "$PORT" ] && return 0
			kill -0 "$BROKER_PID" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$BROKER_PID" 2>/dev/null || ! grep -q 'is not free' "$log"; then
			break # not a port clash: report it
		fi
		wait "$BROKER_PID" 2>/dev/null
		BROKER_PID=""
	done
	echo "rtm cluster up did not start; its log:" >&2
	cat "$log" >&2
	for f in "$data"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
	stop_broker
	return 1
}

cat >"$WORK/run_suite.py" <<'EOF'
import os, runpy, sys, unittest
suite, script, host, port = sys.argv[1:5]
os.chdir(suite)
sys.path.insert(0, suite)
_main = unittest.main
def main(*a, **k):
    k["argv"] = [script, "-v"]   # run every test of the module, verbosely
    return _main(*a, **k)
unittest.main = main
sys.argv = [script, "--hostname=" + host, "-p", port]
runpy.run_path(os.path.join(suite, script), run_name="__main__")
EOF

# Known causes, as diagnosed against rtm (see the header of this script).
hint() {
	local h=""
	case $1 in
	test_subscribe_failure) h="needs the broker to refuse test/nosubscribe with SUBACK 0x80: RTM_AUTH_ACL and RTM_AUTH_ACL_SUBSCRIBE_REFUSAL of testdata/paho/interop.env" ;;
	test_server_keep_alive) h="the suite expects Server Keep Alive 60 for a keepalive of 120 (its own broker's setting): RTM_BROKER_KEEPALIVE_MAX=60s of testdata/paho/interop.env" ;;
	test_client_topic_alias) h="flaky in the suite's client: it may send DISCONNECT before the PUBACK of the last message it received, which the broker then redelivers after the reconnect with the session (see docs/broker.md)" ;;
	test_subscribe_options | test_request_response) h="flaky in the suite: it publishes without waiting for bclient's SUBACK (it waits on callback.subscribeds, not callback2's), so the PUBLISH can be routed before bclient's subscription exists (fix pending upstream: eclipse-paho/paho.mqtt.testing#87)" ;;
	esac
	[ -z "$h" ] || echo "      known cause: $h"
}

status=0
summary=()
for s in $PAHO_SUITES; do
	name=${s%.py}
	# start_broker takes the rtm flags after the name
	start_broker "$name" "$@" || exit 2
	echo "== $s against rtm $PAHO_TARGET (pid $BROKER_PID, 127.0.0.1:$PORT)"
	timeout -k 10 "$PAHO_TIMEOUT" "$PYTHON" -W ignore "$WORK/run_suite.py" "$SUITE" "$s" 127.0.0.1 "$PORT" \
		>"$LOGS/$name.log" 2>&1
	rc=$?
	stop_broker
	ran=$(grep -oE '^Ran [0-9]+ tests?' "$LOGS/$name.log" | grep -oE '[0-9]+' | tail -1)
	failed=$(grep -cE '^(FAIL|ERROR): ' "$LOGS/$name.log")
	if [ -z "$ran" ]; then
		line="$s: did not complete (exit $rc, timeout ${PAHO_TIMEOUT}s?)"
		status=1
		tail -30 "$LOGS/$name.log"
	else
		line="$s: $((ran - failed))/$ran passed, $failed failed"
		unexpected=0
		while read -r kind test; do
			[ -n "$test" ] || continue
			if [[ " $PAHO_ALLOW_FAIL " == *" $test "* ]]; then
				echo "  $kind $test (allowed by PAHO_ALLOW_FAIL)"
			else
				echo "  $kind $test"
				unexpected=1
			fi
			hint "$test"
		done < <(grep -E '^(FAIL|ERROR): ' "$LOGS/$name.log" | sed -E 's/^(FAIL|ERROR): (test[A-Za-z0-9_]*).*/\1 \2/')
		[ "$unexpected" = 0 ] || status=1
		# For each failing test: the exceptions printed while it ran (the
		# 3.1.1 suite catches them and prints the traceback, then fails
		# with a bare "False != True"), then unittest's final exception line.
		awk '
			/^test[A-Za-z0-9_]* \(__main__\./ {cur=$1}
			/^[A-Za-z.]*(Error|Exception)[A-Za-z]*: / && cur!="" && !/^AssertionError: False != True$/ {inline[cur]=inline[cur] "    " cur ": " $0 "\n"}
			/^(FAIL|ERROR): /{p=1; d=0; name=$2; cur=""; next}
			p && /^(-+|=+)$/ {if (d) {printf "%s", inline[name]; print "    " name ": " last; p=0} else d=1; next}
			p && d && NF {last=$0}' "$LOGS/$name.log"
	fi
	summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
[ -n "${PAHO_LOG_DIR:-}" ] && echo "logs in $LOGS"
exit $status
