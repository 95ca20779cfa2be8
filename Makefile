# Gangway: the two commands.
#   make dev   installs what a fresh Debian machine lacks, builds, and runs a local cluster with a demo
#   make test  installs what is missing, then fmt, clippy and the whole test suite
#
# Build products go to a cache outside the clone, so CI and repeated runs reuse them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/gangway/target
export CARGO_TERM_COLOR ?= never
CARGO ?= cargo
SHELL := /bin/bash

# System packages the build needs: libclang for RocksDB's bindings, a C++ compiler for RocksDB itself,
# python3 for the example trainer the demo and the end-to-end tests run.
APT_PACKAGES := libclang-dev clang g++ python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: dev test deps fmt lint unit sim-demo bench bench-peers chaos clean-cache help image

help:
	@echo "make dev    - install missing system packages, build, run a local 3-replica cluster with a demo"
	@echo "make sim-demo - the simulator on the Philly and openb traces, with plots"
	@echo "make test   - install missing system packages, fmt + clippy + every test"
	@echo "make bench  - the benchmarks (release builds; prints numbers)"
	@echo "make bench-peers - Gangway beside etcd and Slurm on this machine, one table (PEERS_QUICK=1: a smoke run)"
	@echo "make chaos  - long seeded fault schedules on real processes (CHAOS_SCHEDULES=20 CHAOS_STEPS=20, CHAOS_SEED=...)"
	@echo "make image  - the container image gangway:dev from the built binary (IMAGE_PROFILE=release, IMAGE_TAG=...)"
	@echo "make fuzz   - every fuzz target under cargo-fuzz (nightly) for FUZZ_SECONDS each (FUZZ_TARGETS=...)"

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

fmt:
	$(CARGO) fmt --all -- --check

# Clippy only type-checks: nothing it builds links RocksDB, so its build script is pointed at a
# library directory instead of compiling RocksDB's C++ again (clippy's host-dependency profile differs
# from the test build's, which would otherwise cost a second 20-minute RocksDB build on a cold cache).
LINT_ROCKSDB_ENV := ROCKSDB_LIB_DIR=$(CARGO_TARGET_DIR)/lint-no-rocksdb ROCKSDB_STATIC=1
lint:
	$(LINT_ROCKSDB_ENV) $(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Ends with one totals line over every test binary, so a log's last line says how many tests ran.
unit:
	@mkdir -p $(CARGO_TARGET_DIR)
	set -o pipefail; $(CARGO) test --workspace --locked 2>&1 | tee $(CARGO_TARGET_DIR)/test-output.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "tests: %d passed, %d failed\n", p, f}' \
	  $(CARGO_TARGET_DIR)/test-output.log

test: deps fmt lint unit

# The local cluster: three replicas as child processes, four fake 8-GPU hosts in two racks, a demo
# workload; Ctrl-C stops it. A debug build: it shares the test build's cache, so after `make test`
# it starts in seconds. DEV_FLAGS=--smoke runs the demo, checks it, and exits.
DEV_FLAGS ?=
dev: deps
	$(CARGO) build --locked --bin gangway --bin gangway-shim
	$(CARGO_TARGET_DIR)/debug/gangway dev $(DEV_FLAGS)

# The simulator on real traces: two weeks of Philly at five times its arrival rate through four
# policies (static reservations make jobs wait while GPUs idle), then one seed of the FGD packing
# experiment. Plots go to $(DEMO_DIR).
DEMO_DIR ?= $(CURDIR)/.demo
sim-demo: deps
	$(CARGO) build --release --locked --bin gangway
	@mkdir -p $(DEMO_DIR)
	$(CARGO_TARGET_DIR)/release/gangway sim replay --trace ../shared/traces/philly/philly.csv \
	  --cluster deploy/sim/philly-cluster.toml --policy first-fit,best-fit,static-quota,gangway \
	  --from 30d --to 44d --load 5 --plot $(DEMO_DIR)/philly-replay.svg
	$(CARGO_TARGET_DIR)/release/gangway sim fgd --nodes ../shared/traces/openb/openb_node_list_gpu_node.csv \
	  --pods ../shared/traces/openb/openb_pod_list_default.csv --tune 1.3 --seeds 1 \
	  --policy best-fit,fgd,gangway --plot $(DEMO_DIR)/fgd.svg
	@echo "plots: $(DEMO_DIR)/philly-replay.svg $(DEMO_DIR)/fgd.svg; more in core/SIM.md"

# The container image, assembled from the built binary and the libraries it links (no base image is
# pulled; see deploy/image/build-image.sh). A debug build by default: it reuses the test build's
# cache. IMAGE_PROFILE=release for a production image; an unchanged binary is not imported again.
IMAGE_PROFILE ?= debug
IMAGE_TAG ?= gangway:dev
image: deps
	$(CARGO) build --locked $(if $(filter release,$(IMAGE_PROFILE)),--release) --bin gangway --bin gangway-shim
	deploy/image/build-image.sh --binary $(CARGO_TARGET_DIR)/$(IMAGE_PROFILE)/gangway --tag $(IMAGE_TAG)

# Chaos: seeded random fault schedules (kill -9, SIGSTOP, partitions, failing devices) against three
# replicas and three workers while a client submits, cancels and migrates; checks what actually ran
# against the invariants (no device shared, none used after its fence). `make test` runs one short schedule; this runs long ones and ends with a summary line.
# A failure prints its seed and a one-line reproduce command.
CHAOS_SCHEDULES ?= 20
CHAOS_STEPS ?= 20
chaos: deps
	CHAOS_SCHEDULES=$(CHAOS_SCHEDULES) CHAOS_STEPS=$(CHAOS_STEPS) $(if $(CHAOS_SEED),CHAOS_SEED=$(CHAOS_SEED)) \
	  $(CARGO) test --locked --test chaos -- --nocapture

bench: deps
	$(CARGO) bench --locked -p gangway-core --bench placement
	$(CARGO) bench --locked -p gangway-consensus --bench raft_bench
	$(CARGO) bench --locked --bench e2e

# Gangway beside the systems people would otherwise use, on this machine in one run: 3-member etcd
# (replicated writes, leader kills) and Slurm with 8 slurmd (jobs, gangs, submit rates). Installs
# what is missing (apt: etcd-server etcd-client slurm-wlm munge), builds release, prints one table of
# ratios. Knobs and what each row measures: deploy/peers/README.md.
bench-peers: deps
	deploy/peers/bench-peers.sh

# Fuzzing: each decoder of untrusted bytes is a target in fuzz/ (cargo-fuzz, libFuzzer, nightly)
# calling a plain library function; `make test` runs the same functions over their seeds and a few
# thousand mutants on stable. This runs libFuzzer on each for FUZZ_SECONDS, from the targets' own
# seeds (written by their short runs) and what earlier runs found (fuzz/corpus, not committed).
# It reuses the test build's RocksDB library when there is one (the targets never open a database).
# A crash stops it and leaves the input in fuzz/artifacts/TARGET/; replay it with
# `cd fuzz && cargo +nightly fuzz run --sanitizer none TARGET artifacts/TARGET/crash-...`.
.PHONY: fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= spec client_request worker_request log_entry snapshot backup raft_message
FUZZ_ROCKSDB_LIB := $(firstword $(wildcard $(CARGO_TARGET_DIR)/debug/build/librocksdb-sys-*/out/librocksdb.a))
FUZZ_ENV := CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/fuzz $(if $(FUZZ_ROCKSDB_LIB),ROCKSDB_LIB_DIR=$(dir $(FUZZ_ROCKSDB_LIB)) ROCKSDB_STATIC=1)
FUZZ_FLAGS := --sanitizer none --codegen-units 16
fuzz: deps
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@cargo fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	GANGWAY_FUZZ_CORPUS=$(CURDIR)/fuzz/corpus $(CARGO) test --locked -p gangway-proto -p gangway-consensus -p gangway-scheduler --lib fuzz_
	cd fuzz && $(FUZZ_ENV) cargo +nightly fuzz build $(FUZZ_FLAGS)
	@set -o pipefail; cd fuzz && for t in $(FUZZ_TARGETS); do \
	  echo "== $$t ($(FUZZ_SECONDS)s)"; \
	  $(FUZZ_ENV) cargo +nightly fuzz run $(FUZZ_FLAGS) $$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
	    | grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done|SUMMARY)|panicked|deadly signal' || exit 1; \
	done; echo "fuzz: every target ran $(FUZZ_SECONDS)s without a crash"
