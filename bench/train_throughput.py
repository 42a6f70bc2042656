"""Throughput of the trainer vs plain PyTorch loops on the same batch, in one run.

    python bench/train_throughput.py                  # CPU: the comparisons below
    python bench/train_throughput.py --device cuda    # GPU: GPT-2 124M bf16 tokens/s and MFU too

Two baselines: the same transformers model in a plain AdamW loop (what DeepSpeed and the
trainer's per-step work cost), and a lean hand-written GPT of the same shape in the same loop
(bench/lean_gpt.py: no biases, fused QKV, SDPA; what the model implementation costs as well).
On CPU: 1 process at the demo's shape (ZeRO-0) against both; the same on the shape of a
well-known minimal GPT trainer's CPU example (4 layers, 4 heads, 128 wide, block 64, batch 12);
2 processes, ZeRO-2 against DDP.

Baseline and candidate runs are interleaved (this machine stalls for seconds at a time) and each
reports the median step time over the steps after warm-up; the ratio is tokens/s of the trainer
over tokens/s of the baseline (higher is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "tiny-cpu.yaml"

CPU_SETTINGS = ["training.maxSteps={steps}", "training.evalInterval=0", "training.evalSteps=1",
                "checkpoint.intervalSteps=100000", "training.logInterval=1000", "tokenizer.type=bytes"]  # fmt: skip
#: The CPU example of a well-known minimal GPT trainer: 4 layers, 4 heads, 128 wide, block 64,
#: batch 12 (bytes here, as every comparison: the plain loops draw byte ids).
SMALL_GPT = ["model.layers=4", "model.heads=4", "model.hidden=128", "model.intermediate=512",
             "model.maxPositions=64", "data.sequenceLength=64", "training.globalBatchSize=12",
             "training.microBatchSize=12", "resources.procsPerNode=1"]  # fmt: skip
GPU_SETTINGS = ["model.preset=gpt2-124m", "model.layers=null", "model.heads=null", "model.hidden=null",
                "model.maxPositions=1024", "model.vocabSize=50304", "data.sequenceLength=1024",
                "training.precision=bf16", "training.zero.stage=1", "training.microBatchSize=8",
                "training.globalBatchSize=8", "resources.accelerator=gpu"]  # fmt: skip


def median_step(log: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    times = [r["seconds"] for r in rows if "seconds" in r and r["step"] > warmup]
    return statistics.median(times)


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def run_trainer(tmp: Path, nproc: int, settings: list[str]) -> float:
    out = tmp / f"trainer-{os.urandom(3).hex()}"
    sets = [a for s in settings for a in ("--set", s)]
    cmd = [sys.executable, "-m", "pretrain.cli", "run", str(JOB), "--nproc", str(nproc), "--output", str(out), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for(tmp), check=False)
    if proc.returncode:
        sys.exit(f"trainer failed:\n{proc.stderr[-3000:]}")
    return median_step(out / "work" / "train_log.jsonl", warmup=5)


def run_plain(tmp: Path, nproc: int, settings: list[str], steps: int, device: str, model: str = "job") -> float:
    log = tmp / f"plain-{os.urandom(3).hex()}.jsonl"
    sets = [a for s in settings for a in ("--set", s)]
    script = [str(ROOT / "bench" / "plain_train.py"), "--job", str(JOB), "--step-log", str(log), "--steps", str(steps),
              "--device", device, "--model", model, *sets]  # fmt: skip
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
    else:
        cmd = [sys.executable, *script]
    env = env_for(tmp)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"baseline failed:\n{proc.stderr[-3000:]}")
    return median_step(log, warmup=5)


def compare(
    name: str, tmp: Path, nproc: int, settings: list[str], steps: int, repeats: int, device: str,
    models: tuple[str, ...] = ("job",), compile_modes: tuple[str, ...] = ("off",),
) -> None:  # fmt: skip
    """Interleaved repeats of each baseline (`job`: the transformers model; `lean`: LeanGPT) and
    the trainer (with training.compile off and/or on); prints each trainer variant's tokens/s
    ratio to each baseline."""
    base: dict[str, list[float]] = {m: [] for m in models}
    cand: dict[str, list[float]] = {c: [] for c in compile_modes}
    for i in range(repeats):
        for m in models:
            base[m].append(run_plain(tmp, nproc, settings, steps, device, m))
        for c in compile_modes:
            cand[c].append(run_trainer(tmp, nproc, [*settings, f"training.compile={c == 'on'}".lower()]))
        shown = ", ".join([*(f"plain {m} {base[m][-1] * 1e3:.1f}" for m in models),
                           *(f"trainer compile {c} {cand[c][-1] * 1e3:.1f}" for c in compile_modes)])  # fmt: skip
        print(f"  {name} repeat {i + 1} (ms/step): {shown}", flush=True)
    for c in compile_modes:
        for m in models:
            ratio = statistics.median(base[m]) / statistics.median(cand[c])
            label = {"job": "the same model in a plain loop", "lean": "a lean GPT in a plain loop"}[m]
            print(f"{name}: trainer (compile {c}) / {label}: tokens/s ratio {ratio:.3f} "
                  f"(median of {repeats} interleaved repeats)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["1", "small", "2"], default=None, help="CPU: only one of the comparisons")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="trainer variants to run")
    args = p.parse_args()
    modes = ("off", "on") if args.compile == "both" else (args.compile,)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    steps_setting = [s.format(steps=args.steps) for s in CPU_SETTINGS]
    if args.device == "cpu":
        if args.only in (None, "1"):
            one = [*steps_setting, "training.zero.stage=0", "training.globalBatchSize=16", "training.microBatchSize=8"]
            compare(
                "demo shape, 1 process, fp32, ZeRO-0",
                tmp,
                1,
                one,
                args.steps,
                args.repeats,
                "cpu",
                ("job", "lean"),
                modes,
            )
        if args.only in (None, "small"):
            small = [*steps_setting, *SMALL_GPT, "training.zero.stage=0"]
            compare(
                "4x4x128 block 64, 1 process, ZeRO-0",
                tmp,
                1,
                small,
                args.steps,
                args.repeats,
                "cpu",
                ("job", "lean"),
                modes,
            )
        if args.only in (None, "2"):
            two = [*steps_setting, "training.zero.stage=2"]
            compare("2 processes, ZeRO-2 vs plain DDP", tmp, 2, two, args.steps, args.repeats, "cpu")
        return
    gpu = [*steps_setting, *GPU_SETTINGS]
    compare("GPT-2 124M bf16, 1 GPU, ZeRO-1", tmp, 1, gpu, args.steps, args.repeats, "cuda", ("job", "lean"), modes)
    for mode in modes:
        mfu(tmp, [*gpu, f"training.compile={mode == 'on'}".lower()], mode)


def mfu(tmp: Path, gpu: list[str], mode: str) -> None:
    """GPT-2 124M tokens/s and MFU of one trainer run (median step after warm-up)."""
    out = tmp / f"mfu-{mode}"
    sets = [a for s in gpu for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "pretrain.cli", "run", str(JOB), "--nproc", "1", "--output", str(out), *sets],
                   env=env_for(tmp), check=True, capture_output=True)  # fmt: skip
    rows = [
        json.loads(line) for line in (out / "work" / "train_log.jsonl").read_text().splitlines() if "seconds" in line
    ]
    step = statistics.median(r["seconds"] for r in rows if r["step"] > 5)
    tokens = rows[0]["tokens"]
    from pretrain.trainer.recipe import mfu as model_flops_utilisation
    from pretrain.trainer.recipe import model_flops_per_token

    n_params = 124_475_904  # GPT-2 124M with vocabulary 50304, tied embeddings
    import torch

    from pretrain.metrics.trainer import peak_flops_for

    peak = peak_flops_for(torch.cuda.get_device_name(0))
    used = model_flops_utilisation(model_flops_per_token(n_params, 12, 768, 1024), tokens / step, 1, peak)
    shown = f"{used:.3f}" if used is not None else "unknown (no peak FLOP/s for this device)"
    print(f"GPT-2 124M bf16, compile {mode}: {tokens / step:,.0f} tokens/s, MFU {shown} on "
          f"{torch.cuda.get_device_name(0)}")  # fmt: skip


if __name__ == "__main__":
    main()
