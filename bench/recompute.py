"""Activation recomputation on CPU: peak memory and step time of each mode against none.

Each measurement is a fresh process (so its peak RSS is its own): it builds the model the trainer
builds (`build_model`, recomputation applied from the spec) and runs one step, then `steps` more:
the seconds per step of those, and how far the peak RSS rose above what the process held before
its first step (activations, gradients and the autograd graph). Modes are
interleaved round by round; medians over the rounds, and ratios to "none" from the same run.

    python bench/recompute.py [--rounds 3] [--layers 8] [--hidden 256] [--seq 512] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODES = {
    "none": [],
    "full": ["training.gradientCheckpointing=true"],
    "every-2": ["training.selectiveRecompute.every=2"],
    "attention": ["training.selectiveRecompute.part=attention", "training.selectiveRecompute.every=1"],
}


CHILD = """
import json, resource, sys, time, torch
from pretrain.api import load_job
from pretrain.data.tokenizer import bytes_tokenizer
from pretrain.trainer.model import build_model
sets, batch, seq, steps, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model = build_model(load_job("examples/tiny-cpu.yaml", sets).spec, bytes_tokenizer())
model.train()
ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
def step():
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()  # the first step: its peak is the activations' and gradients' (later ones reuse the memory)
t0 = time.perf_counter()
for _ in range(steps):
    step()
seconds = (time.perf_counter() - t0) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": (peak - before) / 1024}))
"""


def measure(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """One process, one mode: {"seconds": per step, "peak_mb": peak RSS rise}."""
    sets = [f"model.layers={args.layers}", f"model.hidden={args.hidden}", f"model.heads={args.hidden // 64}",
            f"model.intermediate={4 * args.hidden}", f"model.maxPositions={args.seq}", f"data.sequenceLength={args.seq}",
            *MODES[mode]]  # fmt: skip
    argv = json.dumps([sets, args.batch, args.seq, args.steps, args.threads])
    done = subprocess.run([sys.executable, "-c", CHILD, argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode}: the measurement failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            results[mode].append(measure(args, mode))
    base = {k: statistics.median(r[k] for r in results["none"]) for k in ("seconds", "peak_mb")}
    print(f"gpt2 {args.layers} layers x {args.hidden}, batch {args.batch} x {args.seq} tokens, fp32 CPU, "
          f"{args.rounds} interleaved rounds (median [min-max])")  # fmt: skip
    print(f"{'mode':<10} {'s/step':>20} {'time x':>7} {'peak MB above start':>24} {'memory x':>9}")
    for mode, rows in results.items():
        sec = sorted(r["seconds"] for r in rows)
        mb = sorted(r["peak_mb"] for r in rows)
        ms, mm = statistics.median(sec), statistics.median(mb)
        print(f"{mode:<10} {ms:>8.2f} [{sec[0]:.2f}-{sec[-1]:.2f}] {ms / base['seconds']:>7.2f} "
              f"{mm:>10.0f} [{mb[0]:.0f}-{mb[-1]:.0f}] {mm / base['peak_mb']:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
