# rtm: make help lists the targets.
SHELL := bash
.SHELLFLAGS := -o pipefail -euc
.DEFAULT_GOAL := help

GO          ?= go
BIN         := bin/rtm
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.7.0
# The whole suite stays under 15 minutes on 2 cores; -race is always on.
TEST_FLAGS  ?= -race -count=1 -timeout 14m

.PHONY: help build run test test-fork deploy-check bench bench-throughput profile bench-flow bench-cluster bench-router bench-pushapi bench-go memory lint fuzz clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

build: ## build bin/rtm
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/rtm

run: build ## start rtm dev: every role, embedded store in ./data
	./$(BIN) dev

test: ## run every test with the race detector (also compiles benchmarks, runs the mochi fork's tests)
	# A failing test's assertions are repeated at the end: its node logs
	# (t.Log, hundreds of lines) bury them, and CI shows only part of it.
	out=$$(mktemp); trap 'rm -f "$$out"' EXIT; \
	if ! $(GO) test $(TEST_FLAGS) ./... 2>&1 | tee "$$out"; then \
		echo; echo "== failed: the tests and their own lines (node logs left out) =="; \
		grep -E -e '--- FAIL|^FAIL|^panic:|DATA RACE|^[[:space:]]+[[:alnum:]_]+_test\.go:[0-9]+: ' "$$out" \
			| grep -v -E 'testutil\.go:[0-9]+: time=' | tail -n 150; \
		exit 1; \
	fi
	# memory per idle connection is asserted without the race detector, whose
	# instrumentation inflates frames
	$(GO) test -count=1 -run 'TestIdleConnectionMemory' -v ./internal/mochifix | grep -E '^(---|ok|FAIL)|per connection'
	$(GO) test -run '^$$' -bench . -benchtime 1x ./... > /dev/null
	$(MAKE) test-fork

test-fork: ## run the tests of our patched mochi-mqtt fork (third_party/mochi)
	cd third_party/mochi && $(GO) test $(TEST_FLAGS) ./...
	# and once without the race detector: its build reads and writes sockets
	# through syscall.Read/Write, production through raw system calls (patch 97)
	cd third_party/mochi && $(GO) test -count=1 -timeout 5m .

bench: ## rtm (1 and 3 nodes), bare mochi and Mosquitto side by side, writes BENCHMARKS.md and docs/bench/*.svg (BENCH=quick: about 4 minutes; full: about 15, on 2 cores)
	$(GO) run ./bench/suite -write BENCHMARKS.md $(if $(filter quick,$(BENCH)),-quick) | tee bench.out

bench-throughput: ## the older throughput harness against Mosquitto (fan-in, QoS 1, fan-out, connect; see BENCHMARKS.md)
	$(GO) run ./bench/throughput | tee bench-throughput.out

profile: ## CPU and allocation pprof profiles of rtm under QoS 0 fan-in, QoS 1 fan-in, QoS 0 fan-out, into profiles/ (about 2 minutes)
	mkdir -p profiles && $(GO) run ./bench/suite -profile profiles | tee profiles/top.md

bench-flow: ## flow control against Mosquitto, both with default limits: QoS 1 burst, sustained QoS 1 fan-in, stuck subscriber (about 5 minutes)
	$(GO) run ./bench/throughput -defaults -scenarios burst,fanin1,stuck -rounds 3 | tee bench-flow.out

bench-cluster: ## what the cluster costs: cross-node vs same-node throughput and latency (about 2 minutes)
	$(GO) run ./bench/cluster | tee bench-cluster.out

bench-router: ## router decisions per second and latency (10 s)
	$(GO) run ./bench/router

bench-pushapi: ## push API REST publishes against direct MQTT publishes, same run (about 20 s)
	$(GO) run ./bench/pushapi

bench-go: ## the Go micro-benchmarks (mochi fork's publish path)
	cd third_party/mochi && $(GO) test -run '^$$' -bench . -benchmem -count 5 . | tee ../../bench-go.out

memory: ## RSS per idle connection, rtm and Mosquitto, 10,000 connections each (about 10 minutes)
	scripts/memory.sh both

lint: ## gofmt, go vet, staticcheck, go mod tidy check, deployment files
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd third_party/mochi && $(GO) vet ./...
	cd deploy/check && $(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	cd deploy/check && $(GO) run $(STATICCHECK) ./...
	$(GO) mod tidy -diff
	cd deploy/check && $(GO) mod tidy -diff
	$(MAKE) deploy-check

deploy-check: ## check deploy/ (compose, Kubernetes, Prometheus rules, Grafana, docs/monitoring.md) and build the image where Docker runs
	cd deploy/check && $(GO) test -count=1 ./...
	@if command -v yamllint >/dev/null; then yamllint -s -c deploy/.yamllint deploy && echo "yamllint: deploy/ ok"; \
	  else echo "deploy-check: yamllint not installed (apt-get install yamllint): YAML style NOT checked"; fi
	@if docker info >/dev/null 2>&1; then docker build -q -t rtm:check . && echo "docker build: ok"; \
	  else echo "deploy-check: no Docker engine answers: image build skipped"; fi

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	cd third_party/mochi && $(GO) test ./packets -run '^$$' -fuzz FuzzDecode -fuzztime $${FUZZTIME:-30s}
	cd third_party/mochi && $(GO) test . -run '^$$' -fuzz FuzzReadBody -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./broker/link -run '^$$' -fuzz FuzzFrame -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./broker -run '^$$' -fuzz FuzzClusterMessage -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./plugins/token -run '^$$' -fuzz FuzzVerify -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./pushapi -run '^$$' -fuzz FuzzInvalidUTF8 -fuzztime $${FUZZTIME:-30s}

clean: ## remove build output (not ./data)
	rm -rf bin profiles bench.out bench-throughput.out bench-flow.out bench-cluster.out bench-go.out
