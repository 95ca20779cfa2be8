#!/usr/bin/env python3
"""The task the chaos test (tests/chaos.rs) runs: it journals what actually ran, where and when.

Usage: task.py JOURNAL_DIR STEPS STEP_MS LINGER_MS
  STEPS      finish successfully after this many steps (0: run until stopped)
  STEP_MS    time per step; one `tick` line per step
  LINGER_MS  how long the task takes to shut down after SIGTERM (a real trainer flushes, frees
             device memory, ...), still ticking; the worker's grace covers it

One journal file per process, `<job>.t<task>.e<epoch>.<host>.<pid>`, written with O_APPEND, one
line per event, each stamped with CLOCK_BOOTTIME nanoseconds (one clock for every process on the
machine, the same clock the harness and the worker's lease deadlines use):

  start <ns> <pid> <host> <job> <task> <epoch> <uuids|-> <resumed_step>
  lock-conflict <ns> <uuid>      another live process held this device's lock
  tick <ns> <step>
  ckpt <ns> <step>               rank 0 wrote a checkpoint and its manifest
  end <ns> term|done             the last line of a task that stopped on SIGTERM or finished

A task killed by SIGKILL writes no `end`: its last line (a tick, at most one step before its
death) is the last moment it is known to have run.

Each device is a lock file, `dev-<uuid>.lock`, held with flock(2) for the process's whole life;
the kernel releases it when the process dies, however it dies. A task that finds a device's lock
held writes `lock-conflict`: two live processes on one device at one instant, exactly what the
harness must never see. (It keeps running, as a real task on a busy GPU would until it fails.)
"""

import fcntl
import json
import os
import signal
import sys
import time


def now():
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def main():
    journal_dir = sys.argv[1]
    steps = int(sys.argv[2])
    step_ms = int(sys.argv[3])
    linger_ms = int(sys.argv[4])
    env = os.environ
    job = env.get("GANGWAY_JOB_ID", "?")
    task = env.get("GANGWAY_TASK_INDEX", "?")
    epoch = env.get("GANGWAY_LEASE_EPOCH", "?")
    host = env.get("CHAOS_HOST", "?")
    uuids = [u for u in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if u]
    pid = os.getpid()

    requested = {"checkpoint": False, "stop": False}

    def on_checkpoint(_signum, _frame):
        requested["checkpoint"] = True

    def on_stop(_signum, _frame):
        requested["stop"] = True

    signal.signal(signal.SIGUSR1, on_checkpoint)
    signal.signal(signal.SIGTERM, on_stop)

    step = 0
    restore = env.get("GANGWAY_RESTORE_FROM", "")
    if restore:
        try:
            with open(restore) as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            step = 0

    path = os.path.join(journal_dir, f"{job}.t{task}.e{epoch}.{host}.{pid}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(text):
        os.write(fd, (text + "\n").encode())

    # Devices first, then the start line: "start" means "holds its devices now".
    conflicts = []
    locks = []
    for uuid in uuids:
        lock = os.open(os.path.join(journal_dir, f"dev-{uuid}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            conflicts.append((now(), uuid))
        locks.append(lock)
    line(f"start {now()} {pid} {host} {job} {task} {epoch} {','.join(uuids) or '-'} {step}")
    for at, uuid in conflicts:
        line(f"lock-conflict {at} {uuid}")

    ckdir = env.get("GANGWAY_CHECKPOINT_DIR", "")
    stop_at = None
    while True:
        if requested["checkpoint"]:
            requested["checkpoint"] = False
            if task == "0" and ckdir:
                os.makedirs(ckdir, exist_ok=True)
                ck = os.path.join(ckdir, f"step-{step}-epoch-{epoch}.json")
                write_atomic(ck, json.dumps({"step": step}))
                write_atomic(
                    os.path.join(ckdir, "manifest.json"),
                    json.dumps({"path": ck, "step": step, "bytes": 1}),
                )
                line(f"ckpt {now()} {step}")
        if requested["stop"] and stop_at is None:
            stop_at = now() + linger_ms * 1_000_000
        if stop_at is not None and now() >= stop_at:
            line(f"end {now()} term")
            return 0
        if steps and step >= steps:
            line(f"end {now()} done")
            return 0
        time.sleep(step_ms / 1000.0)
        step += 1
        line(f"tick {now()} {step}")


def write_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
