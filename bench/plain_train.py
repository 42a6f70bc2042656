"""Baselines for bench/train_throughput.py: a plain PyTorch loop (AdamW, gradient accumulation,
DDP when launched with several processes), no DeepSpeed, training either the job's transformers
model (`--model job`) or a lean hand-written GPT of the same shape (`--model lean`,
bench/lean_gpt.py).

Writes one JSON line per step ({"step", "seconds"}) to --log on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.api.validation import load_job
from pretrain.data.tokenizer import bytes_tokenizer
from pretrain.trainer.model import build_model, parameter_groups
from pretrain.trainer.recipe import batch_plan


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--step-log", required=True)  # not --log: torchrun would take it as its own --log-dir
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["job", "lean"], default="job")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    job = load_job(args.job, args.overrides)
    spec = job.spec
    torch.manual_seed(spec.training.seed)
    tok = bytes_tokenizer()
    model = build_model(spec, tok)
    vocab = model.config.vocab_size
    if args.model == "lean":
        from lean_gpt import LeanGPT

        c = model.config
        model = LeanGPT(layers=c.num_hidden_layers, heads=c.num_attention_heads, width=c.hidden_size,
                        inner=c.n_inner or 4 * c.hidden_size, positions=c.n_positions, vocab=c.vocab_size)  # fmt: skip
    model = model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.training.precision]
    if dtype != torch.float32:
        model = model.to(dtype) if args.device == "cpu" else model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    o = spec.training.optimizer
    opt = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)
    plan = batch_plan(spec, world)
    seq = spec.data.sequence_length
    gen = torch.Generator().manual_seed(rank)
    log = Path(args.step_log)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        for m in range(plan.accumulation):
            ids = torch.randint(0, vocab, (plan.micro_batch, seq), generator=gen).to(device)
            ctx = (
                torch.autocast("cuda", dtype=dtype)
                if args.device == "cuda" and dtype != torch.float32
                else torch.enable_grad()
            )
            with ctx:
                out = model(ids) if args.model == "lean" else model(input_ids=ids, labels=ids).loss
                loss = out / plan.accumulation
            if world > 1 and m < plan.accumulation - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        if spec.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.training.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        reduced = torch.tensor([float(loss.detach()) * plan.accumulation], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(reduced)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if rank == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, "seconds": time.perf_counter() - t0}) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
