"""Everything a run needs before its first step, built in order and returned as `Parts`.

The order matters and is the same on every rank: the checkpoint to start from (rank 0 decides,
under the store's lease, before anything is written beside the checkpoints); initFrom weights;
the tokenizer (kept beside the checkpoints so every resume tokenizes alike); the data and its
loader; the model and the DeepSpeed engine (its optimizer, schedule and ZeRO stage from
`recipe.py`); then the checkpoint's state loaded into all of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain import tasks
from pretrain.api.quantity import quantity
from pretrain.api.spec import PretrainJob, PretrainJobSpec
from pretrain.api.validation import total_steps
from pretrain.data.collator import Collator
from pretrain.data.loader import DistributedLoader, PackedSplit, Split, eval_batches
from pretrain.data.prepare import prepare_cached, publish_prepared, text_sample
from pretrain.data.stream import RemoteSplit
from pretrain.data.tokenizer import build_tokenizer, fingerprint, save
from pretrain.metrics.trainer import peak_flops_for
from pretrain.storage.checkpoint import CheckpointStore
from pretrain.storage.fs import download_dir, is_local
from pretrain.trainer.checkpointer import Checkpointer
from pretrain.trainer.evaluator import Evaluator
from pretrain.trainer.model import build_model, parameter_groups
from pretrain.trainer.recipe import BatchPlan, batch_plan, deepspeed_config, lr_multiplier, model_flops_per_token
from pretrain.trainer.skipstep import SkipStepAdamW, StepGate
from pretrain.trainer.world import World

log = logging.getLogger("pretrain.trainer")


@dataclass
class Parts:
    tokenizer: Any
    loader: DistributedLoader
    collate: Collator
    evaluator: Evaluator
    engine: Any
    plan: BatchPlan
    steps: int
    start: int
    n_params: int
    #: Model FLOPs per token (for MFU), and the device's peak FLOP/s when known.
    flops_per_token: float
    peak_flops: float | None
    #: The skip-step judge of `training.guard.action: skip` (its optimizer reads it), else None.
    gate: StepGate | None = None


def compile_enabled(spec: PretrainJobSpec) -> bool:
    c = spec.training.compile
    return c if c is not None else spec.resources.accelerator == "gpu"


def setup(job: PretrainJob, workdir: Path, world: World, checkpointer: Checkpointer) -> Parts:
    spec = job.spec
    start_choice = checkpointer.start_choice()  # before anything is written beside the checkpoints
    init_dir = fetch_init(spec, workdir, world)
    tokenizer = job_tokenizer(spec, workdir, world, checkpointer.store, init_dir)
    plan = batch_plan(spec, world.size)
    loader, collate, evaluator = build_data(spec, workdir, world, tokenizer, plan, init_dir is not None)
    model = build_model(spec, tokenizer, init_dir, evaluator.label_names or None)
    n_params = sum(p.numel() for p in model.parameters())
    mode = checkpointer.resume_mode(start_choice)
    gate = StepGate(spec.training.guard, world.device()) if spec.training.guard.action == "skip" else None
    engine, groups = build_engine(spec, model, world, gate, load_universal=mode == "universal")
    start = checkpointer.load(engine, loader, start_choice, mode, groups)
    cfg, seq = model.config, spec.data.sequence_length
    flops = model_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, seq)
    return Parts(tokenizer, loader, collate, evaluator, engine, plan, total_steps(spec) or 1, start, n_params, flops,
                 peak_flops(spec, world), gate)  # fmt: skip


def peak_flops(spec: PretrainJobSpec, world: World) -> float | None:
    """The spec's peak FLOP/s, else the known peak of this GPU (none on CPU)."""
    if spec.monitoring.peak_flops or not world.gpu:
        return spec.monitoring.peak_flops
    import torch

    return peak_flops_for(torch.cuda.get_device_name(world.local_rank))


def fetch_init(spec: PretrainJobSpec, workdir: Path, world: World) -> Path | None:
    """A node-local copy of model.initFrom (downloaded by each node's local rank 0)."""
    uri = spec.model.init_from
    if not uri:
        return None
    target = workdir / "init"
    if world.uploads:
        download_dir(uri, target, dict(spec.checkpoint.storage_options))
    world.barrier()
    return download_dir(uri, target) if is_local(uri) else target


def job_tokenizer(
    spec: PretrainJobSpec, workdir: Path, world: World, store: CheckpointStore, init_dir: Path | None
) -> Any:
    """The job's tokenizer, kept beside its checkpoints so that every resume (and every node)
    tokenizes exactly as the first run did. Rank 0 builds or fetches it. A model initialised
    from an export brings its own tokenizer, which then wins."""
    from transformers import AutoTokenizer

    if init_dir is not None and (init_dir / "tokenizer.json").exists() and spec.tokenizer.type != "pretrained":
        return AutoTokenizer.from_pretrained(str(init_dir))
    tok_dir = workdir / "tokenizer"
    if world.rank == 0:
        # A stored tokenizer is trusted only with a checkpoint to go with it: one left by a run
        # that failed before its first checkpoint (an empty corpus) is rebuilt from this data.
        if store.exists("tokenizer/tokenizer.json") and spec.checkpoint.resume != "never" and store.complete_steps():
            download_dir(f"{store.uri}/tokenizer", tok_dir, store.options, into=True)
        else:
            save(
                build_tokenizer(
                    spec.tokenizer, text_sample(spec.data, spec.tokenizer.sample_bytes), spec.model.vocab_size
                ),
                tok_dir,
            )
            store.upload_dir(tok_dir, "tokenizer")
    world.barrier()
    if world.uploads and world.rank != 0:
        download_dir(f"{store.uri}/tokenizer", tok_dir, store.options, into=True)
    world.barrier()
    return AutoTokenizer.from_pretrained(str(tok_dir))


def packed_splits(spec: PretrainJobSpec, workdir: Path, world: World, tokenizer: Any) -> tuple[Split, Split]:
    """The train and validation splits. With data.cacheUri every rank streams them from there
    (rank 0 first prepares and publishes them when no job has); else node-local shards,
    prepared by each node's local rank 0 and read by every local rank."""
    fp = fingerprint(tokenizer)
    remote = spec.data.cache_uri
    if remote:
        uri = world.broadcast(publish_prepared(spec.data, tokenizer, fp, workdir / "data", remote)
                              if world.rank == 0 else None)  # fmt: skip
        return stream_splits(uri, workdir / "stream", int(quantity(spec.data.stream_cache)), world)
    cache = workdir / "data"
    if world.uploads:
        path = prepare_cached(spec.data, tokenizer, fp, cache, None, publish=False)
    world.barrier()
    if not world.uploads:
        path = prepare_cached(spec.data, tokenizer, fp, cache, None, publish=False)
    return PackedSplit(path, "train"), PackedSplit(path, "val")


def stream_splits(uri: str, folder: Path, node_bytes: int, world: World) -> tuple[Split, Split]:
    """Both splits of the dataset at `uri`, streamed through this rank's share of the node's
    cache (the validation split gets an eighth: evaluation reads a fixed few rows)."""
    import fsspec

    from pretrain.data.stream import read_manifest

    fs, root = fsspec.core.url_to_fs(uri)
    manifest = read_manifest(fs, root, uri)  # once for both splits
    mine = node_bytes // world.local_size
    folder = folder / f"rank-{world.local_rank}"
    train = RemoteSplit(uri, "train", folder / "train", mine - mine // 8, manifest)
    return train, RemoteSplit(uri, "val", folder / "val", mine // 8, manifest)


def build_data(
    spec: PretrainJobSpec, workdir: Path, world: World, tokenizer: Any, plan: BatchPlan, initialised: bool
) -> tuple[DistributedLoader, Collator, Evaluator]:
    """The training loader, its collator, and the evaluator over the validation split."""
    t, objective = spec.training, spec.objective
    names: list[str] | None = None
    train: Any
    task_split: Any = None
    lm: list[Any] = []
    if objective.fine_tuning:
        if not initialised and world.rank == 0:
            log.warning("objective %s without model.initFrom: the task trains from random weights", objective.type)
        train, task_split, names = tasks.load_labeled(objective, spec.data, tokenizer, t.seed)
    else:
        train, val = packed_splits(spec, workdir, world, tokenizer)
        lm = eval_batches(val, rank=world.rank, world_size=world.size, micro_batch=plan.micro_batch, steps=t.eval_steps)
    loader = DistributedLoader(
        train, rank=world.rank, world_size=world.size, micro_batch=plan.micro_batch, accumulation=plan.accumulation,
        seed=spec.data.shuffle_seed, weights=[s.weight for s in spec.data.sources],
        stages=[(None if s.until_tokens is None else s.until_tokens // spec.data.sequence_length, s.weights)
                for s in spec.data.stages],
    )  # fmt: skip
    collate = Collator(
        objective=spec.objective_type, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
        special_ids=tuple(tokenizer.all_special_ids), mask_probability=objective.mask_probability, seed=t.seed,
    )  # fmt: skip
    evaluator = Evaluator(objective, world, collate=collate, lm_batches=lm, task_split=task_split, label_names=names,
                          micro_batch=t.micro_batch_size)  # fmt: skip
    return loader, collate, evaluator


def build_engine(
    spec: PretrainJobSpec, model: Any, world: World, gate: StepGate | None = None, *, load_universal: bool = False
) -> tuple[Any, list[dict[str, Any]]]:
    """The DeepSpeed engine over `model`, and its param groups' settings (without params). With
    a skip-step `gate`, the optimizer is AdamW that leaves out the steps the gate skips."""
    import deepspeed
    import torch

    cfg = deepspeed_config(spec, world.size, gpu=world.gpu)
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}  # read only by load_checkpoint
    o = spec.training.optimizer
    groups = parameter_groups(model, o.weight_decay)

    def schedule(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, spec))

    optimizer: Any = None
    betas = (o.betas[0], o.betas[1])
    if gate is not None:  # validation refuses skip with offloadOptimizer (DeepSpeed's own CPU Adam)
        optimizer = SkipStepAdamW(groups, gate, lr=o.lr, betas=betas, eps=o.eps)
    elif "optimizer" not in cfg:  # DeepSpeed's CPU Adam with offload; else torch's, fused on CUDA
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps, fused=True if world.gpu else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=schedule, config=cfg
    )
    if compile_enabled(spec):
        t0 = time.perf_counter()
        engine.compile()  # lazy: the first step compiles, and the loop logs how long it took
        log.debug("engine.compile set up in %.1fs", time.perf_counter() - t0)
    return engine, [{k: v for k, v in g.items() if k != "params"} for g in groups]
