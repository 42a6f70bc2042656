"""What an elastic resize costs: resuming the demo model (examples/tiny-cpu.yaml, ZeRO-2) at
another world size versus at the size that wrote the checkpoint, in one run.

It trains 20 steps at 2 processes with a checkpoint at step 20, then resumes copies of that
checkpoint with maxSteps 20 (so the resumed run trains nothing: it loads, evaluates and exports),
alternating a same-size resume (2 processes, the baseline) with a resize (1 process: conversion
to the universal format, then the universal load). Each resize starts from a fresh copy, so it
converts every time. Prints the medians, the resize/baseline ratio of the whole run's wall time,
and the conversion and load seconds the trainer recorded (metrics.jsonl, event "reshard").

    python bench/resize.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "tiny-cpu.yaml"
SETS = ["training.maxSteps=20", "checkpoint.intervalSteps=20", "training.evalInterval=0", "training.evalSteps=2"]


def pretrain_run(out: Path, nproc: int) -> float:
    env = dict(os.environ, TMPDIR=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    sets = [a for s in SETS for a in ("--set", s)]
    argv = [sys.executable, "-m", "pretrain.cli", "run", str(JOB), "--nproc", str(nproc), "--output", str(out), *sets]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def copy_of(source: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out / "checkpoints", ignore=shutil.ignore_patterns("final", ".pretrain-lease.json"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pretrain_run(base / "trained", 2)
        source = base / "trained" / "checkpoints"
        same, resized, convert, load = [], [], [], []
        for i in range(args.repeats):
            same.append(pretrain_run(copy_of(source, base / f"same-{i}"), 2))
            out = copy_of(source, base / f"resize-{i}")
            resized.append(pretrain_run(out, 1))
            history = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
            event = next(e for e in history if e.get("event") == "reshard")
            convert.append(event["seconds"])
            load.append(event["load_seconds"])
            size_mb = event["bytes"] / 1e6
        print(f"demo model (examples/tiny-cpu.yaml, ZeRO-2), checkpoint written by 2 processes, {args.repeats} repeats")
        print(f"resume at 2 processes (same size), whole run: median {statistics.median(same):.1f}s")
        print(f"resume at 1 process (resize), whole run:      median {statistics.median(resized):.1f}s")
        print(f"  conversion to the universal format: median {statistics.median(convert):.2f}s ({size_mb:.1f} MB)")
        print(f"  universal load into the engine:     median {statistics.median(load):.2f}s")
        print(f"resize / same-size resume: {statistics.median(resized) / statistics.median(same):.2f}x")


if __name__ == "__main__":
    main()
