#!/bin/sh
# Re-measures the device-failure tables of core/SIM.md ("Device failures"): failures from the
# default model (Llama 3's GPU failure rate), with and without automatic repair, for checkpoint
# intervals of 10 minutes, 30 minutes and 2 hours (and none, pretrain only), on Philly at load 5 and on the pretrain mix
# (seeds 1-3, two weeks). Runs the core crate's `sim` example (the library calls of `gangway sim`,
# without RocksDB) in release. About 5 minutes of CPU.
#
#   deploy/sim/failures.sh               # traces in ../shared/traces
#   TRACES=/path/to/traces FAILURES=mtbf_hours=8600,repair_hours=24 deploy/sim/failures.sh
set -e
cd "$(dirname "$0")/../.."
TRACES=${TRACES:-../shared/traces}
FAILURES=${FAILURES:-default}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/core-release}
cargo build --release -p gangway-core --example sim
SIM="$CARGO_TARGET_DIR/release/examples/sim"
RUNS="--policy gangway --failures $FAILURES --repair compare --checkpoint-interval 10m,30m,2h"

echo "## pretrain mix, seeds 1-3, 336 h"
$SIM bench --cluster deploy/sim/pretrain-cluster.toml --mix pretrain --hours 336 --load 0.9 \
    --seeds 1,2,3 $RUNS
echo "## pretrain mix, seeds 1-3, 336 h, no checkpoint"
$SIM bench --cluster deploy/sim/pretrain-cluster.toml --mix pretrain --hours 336 --load 0.9 \
    --seeds 1,2,3 --policy gangway --failures $FAILURES --repair compare --checkpoint-interval none
echo "## Philly, load 5"
$SIM replay --trace "$TRACES/philly/philly.csv" --cluster deploy/sim/philly-cluster.toml \
    --load 5 $RUNS
