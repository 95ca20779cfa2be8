#!/bin/bash
# Slurm 22.05 beside Gangway, all on this host (make bench-peers; adapted from ../shared/peers/slurm):
# munged, slurmctld and 8 slurmd (n1-n8), 8 fake GPUs each (device files that are /dev/null).
#   slurm.sh start DIR                 configs into DIR/etc, start everything, wait for 8 idle nodes
#   slurm.sh jobs DIR LABEL N ARGS...  N x `sbatch ARGS --wrap true` one after another, then poll
#   slurm.sh array DIR LABEL N ARGS... one `sbatch --array=0-(N-1) ARGS --wrap true` (N <= 1000),
#                                      then poll
#                                      squeue every 0.2 s until the queue is empty
#   slurm.sh submit DIR P K            P submitters x K held jobs (`sbatch -H`), then cancel them
#   slurm.sh stop DIR                  stop what start started (by recorded pid)
# Prints RESULT lines (deploy/peers/table.py reads them). Needs root (SlurmUser=root, munge).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cmd=$1; DIR=$2; shift 2
export SLURM_CONF=$DIR/etc/slurm.conf
ms() { date +%s%3N; }
# From the first submission of the jobs numbered above FIRST to the last one's end, as slurmctld
# logged them (`_slurm_rpc_submit_batch_job: JobId=K`, `_job_complete: JobId=..(K) done` or
# `JobId=K done`; its log stamps milliseconds): the span gangway-jobs.sh reads from the replicas.
recorded() {
  python3 - "$DIR/log/slurmctld.log" "$1" <<'PY' 2>/dev/null || echo "?"
import re, sys
from datetime import datetime
first, subs, ends = int(sys.argv[2]), [], []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\[(\S+)\] (_slurm_rpc_submit_batch_job|_job_complete): JobId=(\S+)(.*)", line)
    if not m:
        continue
    at, what, job, rest = m.groups()
    k = re.search(r"\((\d+)\)$", job) or re.match(r"(\d+)$", job)
    if not k or int(k.group(1)) <= first:
        continue
    t = datetime.fromisoformat(at).timestamp() * 1000
    if what.startswith("_slurm"):
        subs.append(t)
    elif rest.strip() == "done":
        ends.append(t)
print(round(max(ends) - min(subs)) if subs and ends else "?")
PY
}

case $cmd in
start)
  mkdir -p "$DIR"/{etc,state,spool,log,run,dev} /run/munge
  for f in slurm.conf gres.conf; do sed "s#@DIR@#$DIR#g" "$HERE/slurm/$f.in" > "$DIR/etc/$f"; done
  cp "$HERE/slurm/cgroup.conf" "$DIR/etc/"
  for i in 0 1 2 3 4 5 6 7; do [ -e "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3; done
  chown munge:munge /run/munge
  [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged > "$DIR/log/munged.out" 2>&1   # daemonizes
    sleep 1; pgrep -n -x munged > "$DIR/run/munged.pid"
  fi
  rm -rf "$DIR"/state/*
  slurmctld -D -c -f "$SLURM_CONF" > "$DIR/log/slurmctld.out" 2>&1 & echo $! > "$DIR/run/slurmctld.bgpid"
  : > "$DIR/run/slurmd.bgpids"
  for i in 1 2 3 4 5 6 7 8; do
    mkdir -p "$DIR/spool/n$i"
    slurmd -D -N "n$i" -f "$SLURM_CONF" > "$DIR/log/slurmd-n$i.out" 2>&1 & echo $! >> "$DIR/run/slurmd.bgpids"
  done
  for _ in $(seq 1 120); do
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -ge 8 ] && { echo "slurm: 8 nodes idle"; exit 0; }
    sleep 0.5
  done
  echo "slurm: nodes did not come up; see $DIR/log"; sinfo; exit 1 ;;
jobs|array)
  label=$1; n=$2; shift 2
  # %A: every array element has a job id of its own (%i would print 12_999 and hide them).
  first=$(squeue -h -t all -o %A | sort -n | tail -1); first=${first:-0}
  t0=$(ms)
  if [ "$cmd" = array ]; then
    sbatch -Q -o /dev/null -e /dev/null --array="0-$((n-1))" "$@" --wrap true >/dev/null || echo "submit failed"
  else
    for i in $(seq 1 "$n"); do sbatch -Q -o /dev/null -e /dev/null "$@" --wrap true >/dev/null || echo "submit $i failed"; done
  fi
  t1=$(ms)
  while [ "$(squeue -h -t PD,R,CG,CF | wc -l)" -gt 0 ]; do sleep 0.2; done
  t2=$(ms)
  ok=$(scontrol show job -o 2>/dev/null | awk -v f="$first" '{ split($1,a,"="); if (a[2]+0>f+0) print }' | grep -c 'JobState=COMPLETED')
  echo "RESULT jobs slurm label=$label n=$n completed=$ok submit_ms=$((t1-t0)) total_ms=$((t2-t0)) recorded_ms=$(recorded "$first")" ;;
submit)
  P=$1; K=$2; t0=$(ms)
  for p in $(seq 1 "$P"); do ( for k in $(seq 1 "$K"); do sbatch -Q -H -o /dev/null --wrap true >/dev/null || echo "submit failed"; done ) & done; wait
  t1=$(ms); n=$((P*K))
  echo "RESULT submit slurm submitters=$P n=$n ms=$((t1-t0)) rate=$(( n*1000/(t1-t0) ))"
  scancel -t PD >/dev/null 2>&1; sleep 1 ;;
stop)
  for p in $(cat "$DIR/run/slurmd.bgpids" "$DIR/run/slurmctld.bgpid" 2>/dev/null); do kill "$p" 2>/dev/null; done
  [ -f "$DIR/run/munged.pid" ] && kill "$(cat "$DIR/run/munged.pid")" 2>/dev/null
  sleep 3
  for p in $(cat "$DIR/run/slurmd.bgpids" "$DIR/run/slurmctld.bgpid" 2>/dev/null); do kill -0 "$p" 2>/dev/null && kill -9 "$p"; done
  true ;;
*) echo "usage: slurm.sh start|jobs|submit|stop DIR ..."; exit 2 ;;
esac
