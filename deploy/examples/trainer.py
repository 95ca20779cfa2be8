#!/usr/bin/env python3
"""A toy training loop that behaves like a real Gangway task (standard library only).

It counts steps, checkpoints when the worker sends its checkpoint signal, resumes from
GANGWAY_RESTORE_FROM, and prints one line per step, so the end-to-end tests (and people watching
`gangway logs -f`) can check that work is never lost beyond the last checkpoint.

Protocol (what any task can do to be checkpointable under Gangway):
  * the worker sends GANGWAY_CHECKPOINT_SIGNAL (SIGUSR1 by default) to every rank;
  * rank 0 writes the checkpoint into GANGWAY_CHECKPOINT_DIR, then writes manifest.json there
    atomically: {"path": <checkpoint>, "step": <step>, "bytes": <size>};
  * a relaunched gang gets GANGWAY_RESTORE_FROM=<path> and resumes from it.

Usage: trainer.py [--steps N] [--step-ms MS] [--checkpoint-every N] [--busy]
  --steps N             stop successfully after step N (default: run until stopped)
  --step-ms MS          time per step (default 100)
  --checkpoint-every N  also checkpoint on its own every N steps (default: only on request)
  --busy                compute through each step instead of sleeping (keeps its devices busy)
"""

import argparse
import json
import os
import signal
import sys
import time


def log(msg):
    rank = os.environ.get("GANGWAY_TASK_INDEX", "0")
    world = os.environ.get("GANGWAY_TASK_COUNT", "1")
    print(f"[trainer rank={rank}/{world}] {msg}", flush=True)


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore():
    path = os.environ.get("GANGWAY_RESTORE_FROM", "")
    if not path:
        return 0
    with open(path) as f:
        state = json.load(f)
    return int(state["step"])


def checkpoint(step):
    rank = int(os.environ.get("GANGWAY_TASK_INDEX", "0"))
    ckdir = os.environ.get("GANGWAY_CHECKPOINT_DIR", "")
    if not ckdir:
        log("no GANGWAY_CHECKPOINT_DIR; cannot checkpoint")
        return
    if rank != 0:
        # Rank 0 writes the gang's checkpoint; the other ranks only note the request.
        log(f"checkpoint request seen at step {step}")
        return
    os.makedirs(ckdir, exist_ok=True)
    epoch = os.environ.get("GANGWAY_LEASE_EPOCH", "0")
    path = os.path.join(ckdir, f"step-{step:08d}-epoch-{epoch}.json")
    body = json.dumps({"step": step, "job": os.environ.get("GANGWAY_JOB_ID", "")})
    write_atomic(path, body)
    manifest = {"path": path, "step": step, "bytes": len(body)}
    write_atomic(os.path.join(ckdir, "manifest.json"), json.dumps(manifest))
    log(f"checkpoint step={step} path={path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--step-ms", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    # Spend each step computing instead of sleeping: the task keeps its devices busy (with fake
    # devices, utilization follows the task's CPU use), the way a real training step would.
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()

    requested = {"checkpoint": False, "stop": False}
    sig_name = os.environ.get("GANGWAY_CHECKPOINT_SIGNAL", "SIGUSR1")
    ck_signal = getattr(signal, sig_name, signal.SIGUSR1)

    def on_checkpoint(_signum, _frame):
        requested["checkpoint"] = True

    def on_stop(_signum, _frame):
        requested["stop"] = True

    signal.signal(ck_signal, on_checkpoint)
    if ck_signal != signal.SIGTERM:
        signal.signal(signal.SIGTERM, on_stop)

    step = restore()
    log(
        "start job={} epoch={} restore_from={} resumed_step={} devices={} master={}".format(
            os.environ.get("GANGWAY_JOB_ID", "?"),
            os.environ.get("GANGWAY_LEASE_EPOCH", "?"),
            os.environ.get("GANGWAY_RESTORE_FROM", "-") or "-",
            step,
            os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("TPU_VISIBLE_CHIPS", "-")),
            os.environ.get("GANGWAY_MASTER_ADDR", "-"),
        )
    )
    while True:
        if requested["checkpoint"]:
            requested["checkpoint"] = False
            checkpoint(step)
        if requested["stop"]:
            log(f"stopping at step {step}")
            return 0
        if args.steps and step >= args.steps:
            log(f"done at step {step}")
            return 0
        if args.busy:
            until = time.monotonic() + args.step_ms / 1000.0
            while time.monotonic() < until:
                pass
        else:
            time.sleep(args.step_ms / 1000.0)
        step += 1
        log(f"step {step}")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint(step)


if __name__ == "__main__":
    sys.exit(main())
