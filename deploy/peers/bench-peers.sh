#!/bin/bash
# make bench-peers: Gangway beside etcd and Slurm on this machine, in one run, one table.
# See deploy/peers/README.md for what each row measures. Knobs (defaults = the full run):
#   PEERS_CLIENTS=1,16,64,256  PEERS_WRITE_SECS=10  PEERS_KILLS=20     (vs etcd)
#   PEERS_WRITE_ROUNDS=3           the writes in this many rounds, the two systems in turn; each row
#                                  is the round of median throughput (this VM drifts between runs)
#   PEERS_JOBS=1000  PEERS_GANGS=100  PEERS_SUBMITS=400                (vs Slurm)
#   PEERS_TLS=on|off|both (both)   Gangway's job runs: mutual TLS (production) and/or plain TCP
#   PEERS_ONLY=raft|jobs           one half only
#   PEERS_QUICK=1                  a smoke run: small counts, 2 s writes, 3 kills
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gangway/target}
CARGO=${CARGO:-cargo}
if [ "${PEERS_QUICK:-0}" != 0 ]; then
  : "${PEERS_CLIENTS:=1,16}" "${PEERS_WRITE_SECS:=2}" "${PEERS_KILLS:=3}" "${PEERS_JOBS:=100}" "${PEERS_GANGS:=10}" "${PEERS_SUBMITS:=40}" "${PEERS_WRITE_ROUNDS:=1}"
fi
ROUNDS=${PEERS_WRITE_ROUNDS:-3}
export PEERS_CLIENTS=${PEERS_CLIENTS:-1,16,64,256} PEERS_WRITE_SECS=${PEERS_WRITE_SECS:-10} PEERS_KILLS=${PEERS_KILLS:-20}
export PEERS_JOBS=${PEERS_JOBS:-1000} PEERS_GANGS=${PEERS_GANGS:-100} PEERS_SUBMITS=${PEERS_SUBMITS:-400}
TLS=${PEERS_TLS:-both}; ONLY=${PEERS_ONLY:-}
OUT=$CARGO_TARGET_DIR/bench-peers; RUN=$OUT/run
rm -rf "$RUN"; mkdir -p "$RUN"; RESULTS=$OUT/results.txt; : > "$RESULTS"
say() { echo "== $*"; }

# 1. What the peers need, from apt, only what is missing; without apt (or root) their rows are skipped.
have_etcd=0; have_slurm=0
missing=""
for p in etcd-server etcd-client slurm-wlm munge; do
  dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    say "installing:$missing"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null \
      || echo "apt-get install failed: the peers that need$missing are skipped"
  else
    echo "no apt-get (or no root): cannot install$missing; those peers are skipped, Gangway still runs"
  fi
fi
command -v etcd >/dev/null && have_etcd=1
if command -v slurmctld >/dev/null && [ -x /usr/sbin/munged ]; then
  if [ "$(id -u)" = 0 ]; then have_slurm=1; else echo "Slurm here runs as root (SlurmUser=root, munge): skipped"; fi
fi

# 2. Release builds: the gangway binaries and the consensus bench (both share the release cache;
#    --workspace, not -p: the same features as the binary, so RocksDB is built once).
cd "$ROOT"
say "building (release)"
$CARGO build --release --locked --bin gangway --bin gangway-shim || exit 1
$CARGO bench --locked --workspace --bench peers_raft --no-run || exit 1
GW=$CARGO_TARGET_DIR/release/gangway
raft() { $CARGO bench --locked -q --workspace --bench peers_raft -- run "$@"; }

{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# etcd: $(etcd --version 2>/dev/null | head -1); slurm: $(slurmctld -V 2>/dev/null)"
} >> "$RESULTS"

# 3. Replicated writes and leader kills: etcd, then Gangway's consensus layer.
if [ "$ONLY" != jobs ]; then
  if [ $have_etcd = 1 ]; then say "etcd: writes and $PEERS_KILLS leader kills"; raft etcd "$RUN/etcd" | tee -a "$RESULTS"
  else echo "etcd missing: its rows are skipped"; fi
  say "gangway consensus: writes and $PEERS_KILLS leader kills"; raft gangway "$RUN/raft" | tee -a "$RESULTS"
  # More rounds of the writes alone, the two systems in turn (Gangway first in even rounds).
  for ((r = 2; r <= ROUNDS; r++)); do
    order=(etcd gangway); (( r % 2 == 0 )) && order=(gangway etcd)
    for sys in "${order[@]}"; do
      [ $sys = etcd ] && [ $have_etcd = 0 ] && continue
      say "$sys: writes, round $r of $ROUNDS"
      PEERS_KILLS=0 raft $sys "$RUN/$sys-round-$r" | tee -a "$RESULTS"
    done
  done
  # The same kills with leader-loss detection off: what the election timeout alone gives.
  say "gangway consensus: $PEERS_KILLS leader kills, detection off"
  PEERS_CLIENTS="" PEERS_DETECT=off raft gangway "$RUN/raft-nodetect" | tee -a "$RESULTS"
  # The same writes replicated one unary AppendEntries call at a time (as before the stream).
  say "gangway consensus: writes, one AppendEntries call at a time"
  PEERS_KILLS=0 PEERS_REPLICATION=calls raft gangway "$RUN/raft-calls" | tee -a "$RESULTS"
fi

# 4. Jobs on 8 hosts and submit rates: Slurm, then Gangway (TLS on, then off).
if [ "$ONLY" != raft ]; then
  if [ $have_slurm = 1 ]; then
    say "slurm: $PEERS_JOBS trivial jobs, $PEERS_GANGS gangs, submit rates"
    S=$RUN/slurm
    if "$HERE/slurm.sh" start "$S"; then
      "$HERE/slurm.sh" jobs "$S" trivial "$PEERS_JOBS" --gres=gpu:1 | tee -a "$RESULTS"
      "$HERE/slurm.sh" array "$S" array "$(( PEERS_JOBS < 1000 ? PEERS_JOBS : 1000 ))" --gres=gpu:1 | tee -a "$RESULTS"
      "$HERE/slurm.sh" jobs "$S" gang "$PEERS_GANGS" -N 2 --ntasks-per-node=1 --gres=gpu:8 | tee -a "$RESULTS"
      for p in 1 8; do "$HERE/slurm.sh" submit "$S" $p $((PEERS_SUBMITS / p)) | tee -a "$RESULTS"; done
    fi
    "$HERE/slurm.sh" stop "$S"
  fi
  modes=(tls insecure); [ "$TLS" = on ] && modes=(tls); [ "$TLS" = off ] && modes=(insecure)
  for m in "${modes[@]}"; do
    say "gangway ($m): $PEERS_JOBS trivial jobs, $PEERS_GANGS gangs, submit rates"
    "$HERE/gangway-jobs.sh" "$GW" "$RUN/gangway-$m" "$m" | tee -a "$RESULTS"
  done
fi

say "results: $RESULTS"
python3 "$HERE/table.py" "$RESULTS" "$(head -2 "$RESULTS" | sed 's/^# //' | paste -sd';' -)" | tee "$OUT/table.md"
