#!/bin/bash
# Gangway's side of the job workloads of make bench-peers: 3 `gangway server` replicas and 8
# `gangway worker` processes (n1-n8, --fake-devices 8xH100) on this host, as deploy/peers/slurm.sh
# runs Slurm, driven through the `gangway` CLI as Slurm is through sbatch/squeue.
#   gangway-jobs.sh GANGWAY DIR tls|insecure
# Workloads (RESULT lines for deploy/peers/table.py):
#   trivial: PEERS_JOBS (1000) x `gangway submit` of a 1-GPU job running `true`, one after another,
#            then `gangway jobs --state pending,running` every 0.2 s until none is left
#   array:   min(PEERS_JOBS, 1000) trivial jobs as one job array (`gangway submit --array N`, as
#            Slurm's `sbatch --array`, whose default MaxArraySize is 1001), polled the same way
#   gang:    PEERS_GANGS (100) x a gang of 2 tasks x 8 GPUs running `true`, the same way
#   submit:  1 and 8 parallel submitters, PEERS_SUBMITS (400) jobs each time, of a job no host can
#            place (16 devices per task on 8-GPU hosts: it stays pending, as Slurm's held jobs do)
#   drill:   not in the default: PEERS_DRILLS (6) x `gangway drill partition-leader --for 4s` (the
#            leader cut off from the others, not killed), each drill's time to a new leader and to
#            the first placement after the fault (the replicas run with allow_drills = true)
# PEERS_PARTS (default "trivial array gang submit") runs some of them only.
# Configuration: the production defaults (deploy/config/gangway-server.toml) except ports, data
# directories, and the per-client submit rate limit (200/s by default, for every client on one
# address: all of ours are 127.0.0.1), raised so that it does not cap what is measured.
# tls: mutual TLS on every link as in production (`gangway tls init/issue`); insecure: plain TCP.
set -uo pipefail
GW=$1; DIR=$2; MODE=${3:-tls}
JOBS=${PEERS_JOBS:-1000}; GANGS=${PEERS_GANGS:-100}; SUBMITS=${PEERS_SUBMITS:-400}; DRILLS=${PEERS_DRILLS:-6}
PARTS=" ${PEERS_PARTS:-trivial array gang submit} "
part() { [[ $PARTS == *" $1 "* ]]; }
ms() { date +%s%3N; }
rm -rf "$DIR"; mkdir -p "$DIR"
ADDRS=127.0.0.1:15101,127.0.0.1:15102,127.0.0.1:15103
CLUSTER=1=127.0.0.1:15101,2=127.0.0.1:15102,3=127.0.0.1:15103
export GANGWAY_ADDR=$ADDRS
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 2; for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT

if [ "$MODE" = tls ]; then
  T=$DIR/tls
  "$GW" tls init --dir "$T" >/dev/null
  for i in 1 2 3; do "$GW" tls issue server $i --dir "$T" >/dev/null; done
  for i in 1 2 3 4 5 6 7 8; do "$GW" tls issue worker n$i --dir "$T" >/dev/null; done
  "$GW" tls issue client admin --dir "$T" >/dev/null
  export GANGWAY_TLS_CA=$T/ca.pem GANGWAY_TLS_CERT=$T/client-admin.pem GANGWAY_TLS_KEY=$T/client-admin-key.pem
else
  export GANGWAY_INSECURE=true
fi

for i in 1 2 3; do
  mkdir -p "$DIR/replica-$i"
  {
    echo "id = $i"
    echo "listen = \"127.0.0.1:1510$i\""
    echo "http = \"127.0.0.1:1520$i\""
    echo "data_dir = \"$DIR/replica-$i\""
    echo "initial_cluster = \"$CLUSTER\""
    part drill && echo "allow_drills = true"
    echo "[clients]"
    echo "submit_per_second = 1000000"
    echo "submit_burst = 1000000"
    echo "[tls]"
    if [ "$MODE" = tls ]; then
      echo "ca = \"$T/ca.pem\""; echo "cert = \"$T/server-$i.pem\""; echo "key = \"$T/server-$i-key.pem\""
      echo "[access]"; echo "admins = [\"client/admin\"]"
    else
      echo "insecure = true"
    fi
  } > "$DIR/replica-$i.toml"
  "$GW" server --config "$DIR/replica-$i.toml" > "$DIR/replica-$i.log" 2>&1 & PIDS+=($!)
done
for _ in $(seq 1 120); do
  "$GW" cluster status -o json 2>/dev/null | grep -q '"leader_id": [1-9]' && break; sleep 0.5
done

for i in 1 2 3 4 5 6 7 8; do
  if [ "$MODE" = tls ]; then TLSW=(--tls-ca "$T/ca.pem" --tls-cert "$T/worker-n$i.pem" --tls-key "$T/worker-n$i-key.pem"); else TLSW=(--insecure); fi
  "$GW" worker --servers "$ADDRS" --node n$i --listen 127.0.0.1:1530$i --advertise 127.0.0.1:1530$i \
    --fake-devices 8xH100 --data-dir "$DIR/worker-n$i" --task-user-same-as-agent --stop-tasks-on-exit \
    "${TLSW[@]}" > "$DIR/worker-n$i.log" 2>&1 & PIDS+=($!)
done
ready=0
for _ in $(seq 1 240); do
  ready=$("$GW" nodes -o json 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin)["nodes"] if n["state"]=="ready"))' 2>/dev/null || echo 0)
  [ "$ready" -ge 8 ] && break; sleep 0.5
done
[ "$ready" -ge 8 ] || { echo "gangway: only $ready of 8 hosts ready; logs in $DIR"; exit 1; }
echo "gangway ($MODE): 3 replicas, 8 hosts ready"

cat > "$DIR/trivial.toml" <<'J'
name = "trivial"
command = ["true"]
[resources]
devices = 1
J
cat > "$DIR/gang.toml" <<'J'
name = "gang"
tasks = 2
command = ["true"]
[resources]
devices = 8
J
cat > "$DIR/unplaceable.toml" <<'J'
name = "unplaceable"
command = ["true"]
[resources]
devices = 16
J

# Polled every 0.2 s while jobs run, so as cheap as slurm.sh's `squeue | wc -l`: no Python (whose
# start-up, through pyenv where there is one, cost ~7% of the machine in the array run). 1 while
# any job is pending or running (the listing names one), 0 when none, error when the call fails.
left() {
  local out
  out=$("$GW" jobs --state pending,running --limit 1 -o json 2>/dev/null) || { echo error; return; }
  case $out in *'"id"'*) echo 1 ;; *'"jobs"'*) echo 0 ;; *) echo error ;; esac
}
count() { "$GW" jobs --state "$1" -o json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["jobs"]))' 2>/dev/null || echo "?"; }
# The same span as the replicas recorded it: from the first of the jobs submitted since T0 (ms,
# this host's clock, which stamps the leader's entries too) being accepted to the last one's end,
# both leader-stamped (`submitted_at_ms`, `finished_at_ms`); free of the CLI's start and of the
# poll's up to 0.2 s. slurm.sh reads Slurm's from slurmctld's log the same way.
recorded() {
  "$GW" jobs --state succeeded,failed,cancelled -o json 2>/dev/null | python3 -c '
import json, sys
jobs = [j for j in json.load(sys.stdin)["jobs"] if j["submitted_at_ms"] >= int(sys.argv[1])]
ends = [j["finished_at_ms"] for j in jobs if j.get("finished_at_ms")]
print(max(ends) - min(j["submitted_at_ms"] for j in jobs) if ends else "?")' "$1" 2>/dev/null || echo "?"
}

run_jobs() {  # LABEL N SPEC [array]
  local label=$1 n=$2 spec=$3 before t0 t1 t2 ok
  before=$(count succeeded)
  t0=$(ms)
  if [ "${4:-}" = array ]; then
    for ((k = 0; k < n; k += 1000)); do
      "$GW" submit "$spec" --array $(( n - k < 1000 ? n - k : 1000 )) >/dev/null || echo "submit failed"
    done
  else
    for _ in $(seq 1 "$n"); do "$GW" submit "$spec" >/dev/null || echo "submit failed"; done
  fi
  t1=$(ms)
  local errs=0 l
  while l=$(left); [ "$l" != 0 ]; do
    if [ "$l" = error ]; then errs=$((errs+1)); [ $errs -ge 50 ] && { echo "gangway jobs fails 50 times in a row; logs in $DIR"; exit 1; }; else errs=0; fi
    sleep 0.2
  done
  t2=$(ms)
  ok=$(( $(count succeeded) - before ))
  echo "RESULT jobs gangway-$MODE label=$label n=$n completed=$ok submit_ms=$((t1-t0)) total_ms=$((t2-t0)) recorded_ms=$(recorded "$t0")"
}
part trivial && run_jobs trivial "$JOBS" "$DIR/trivial.toml"
part array && run_jobs array "$(( JOBS < 1000 ? JOBS : 1000 ))" "$DIR/trivial.toml" array
part gang && run_jobs gang "$GANGS" "$DIR/gang.toml"

part submit && for P in 1 8; do
  K=$(( SUBMITS / P )); t0=$(ms); subs=()
  for _ in $(seq 1 $P); do ( for _ in $(seq 1 $K); do "$GW" submit "$DIR/unplaceable.toml" >/dev/null || echo "submit failed"; done ) & subs+=($!); done
  wait "${subs[@]}"
  t1=$(ms); n=$(( P * K ))
  echo "RESULT submit gangway-$MODE submitters=$P n=$n ms=$((t1-t0)) rate=$(( n*1000/(t1-t0) ))"
done

part drill && for d in $(seq 1 "$DRILLS"); do
  "$GW" drill partition-leader --for 4s -o json > "$DIR/drill-$d.json" 2> "$DIR/drill-$d.err"
  rc=$?
  python3 - "$DIR/drill-$d.json" "$d" "$MODE" "$rc" <<'P'
import json, sys
path, d, mode, rc = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    r = {}
print(f"RESULT drill gangway-{mode} n={d} rc={rc} new_leader_ms={r.get('time_to_new_leader_ms', '?')} "
      f"first_placement_ms={r.get('time_to_first_placement_ms', '?')} passed={str(r.get('passed', '?')).lower()}")
P
  sleep 3
done
