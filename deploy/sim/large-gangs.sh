#!/bin/sh
# Re-measures the large-gang tables of core/SIM.md ("Large gangs: the pretrain mix"): the pretrain
# mix on deploy/sim/pretrain-cluster.toml (seeds 1-2 tuned on, 3-10 not), Philly at load 1 and 5,
# and the FGD experiment's gangway figure. Runs the core crate's `sim` example (the library calls
# of `gangway sim`, without RocksDB) in release. About 15 minutes of CPU.
#
#   deploy/sim/large-gangs.sh            # traces in ../shared/traces
#   TRACES=/path/to/traces deploy/sim/large-gangs.sh
set -e
cd "$(dirname "$0")/../.."
TRACES=${TRACES:-../shared/traces}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/core-release}
cargo build --release -p gangway-core --example sim
SIM="$CARGO_TARGET_DIR/release/examples/sim"
P=first-fit,best-fit,fgd,backfill,gangway
PRETRAIN="bench --cluster deploy/sim/pretrain-cluster.toml --mix pretrain --hours 336 --load 0.9"

echo "## pretrain, seeds tuned on"
$SIM $PRETRAIN --seeds 1,2 --policy $P
echo "## pretrain, unseen seeds"
$SIM $PRETRAIN --seeds 3,4,5 --policy $P
$SIM $PRETRAIN --seeds 6,7,8,9,10 --policy $P
for load in 1 5; do
    echo "## Philly, load $load"
    $SIM replay --trace "$TRACES/philly/philly.csv" --cluster deploy/sim/philly-cluster.toml \
        --load $load --policy $P
done
echo "## FGD experiment (openb default), 3 seeds"
$SIM fgd --nodes "$TRACES/openb/openb_node_list_gpu_node.csv" \
    --pods "$TRACES/openb/openb_pod_list_default.csv" --seeds 3 --policy best-fit,fgd,gangway
