"""The training loop: one job spec in, a trained, checkpointed, exported model out.

Read `Trainer.run` top to bottom: distributed set-up, tokenizer and data, model and DeepSpeed
engine, resume, the step loop (forward/backward over micro-batches, one all-reduce for the loss
and the stop flag, log, evaluate, checkpoint), then the final checkpoint and export. DeepSpeed,
storage and metrics sit behind small helpers so the loop does not grow their details.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from pretrain.api.spec import PretrainJob
from pretrain.api.validation import total_steps
from pretrain.clitools import shown
from pretrain.data import labeled
from pretrain.data.collator import Collator
from pretrain.data.loader import DistributedLoader, PackedSplit, eval_batches
from pretrain.data.prepare import prepare_cached, text_sample
from pretrain.data.tokenizer import build_tokenizer, fingerprint, save
from pretrain.metrics.history import RunHistory
from pretrain.metrics.trainer import Labels, TrainerMetrics, peak_flops_for
from pretrain.storage.checkpoint import CheckpointError, CheckpointStore, step_name
from pretrain.storage.fs import download_dir, out_of_space
from pretrain.trainer import tasks, universal
from pretrain.trainer.extensions import seed_extension_cache
from pretrain.trainer.model import build_model, parameter_groups
from pretrain.trainer.progress import Progress
from pretrain.trainer.recipe import batch_plan, deepspeed_config, lr_multiplier, model_flops_per_token
from pretrain.trainer.termination import write_done

log = logging.getLogger("pretrain.trainer")

#: Masking seed "step" of evaluation batches: fixed, and apart from every training step.
EVAL_MASK_STREAM = 2**32 - 1


class Trainer:
    def __init__(self, job: PretrainJob, workdir: Path) -> None:
        self.job = job
        self.spec = job.spec
        self.workdir = workdir
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.node_rank = self.rank // self.local_world
        self.attempt = int(os.environ.get("PRETRAIN_ATTEMPT", "1"))
        self.stop_requested = False
        self.signalled_at: float | None = None  # when SIGTERM/SIGINT came (time.monotonic)
        self.gpu = self.spec.resources.accelerator == "gpu"
        self.history = RunHistory.off(workdir)
        self._last_checkpoint_logged: int | None = None
        self._groups: list[dict[str, Any]] = []
        #: What a resume at another world size or stage cost (rank 0, when it converted).
        self.reshard: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stop_requested:
            self.signalled_at = time.monotonic()
            log.warning(
                "received %s: saving a checkpoint at the end of this step, then exiting", signal.Signals(signum).name
            )
        self.stop_requested = True

    def init_distributed(self) -> None:
        import torch

        if self.gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.accelerator is gpu but no CUDA device is visible; use accelerator: cpu")
            torch.cuda.set_device(self.local_rank)
        else:
            seed_extension_cache()  # DeepSpeed's CPU op, compiled into the image, instead of a 30 s build
        import deepspeed

        deepspeed.init_distributed(verbose=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def fetch_init(self) -> Path | None:
        """A node-local copy of model.initFrom (downloaded by each node's local rank 0)."""
        uri = self.spec.model.init_from
        if not uri:
            return None
        target = self.workdir / "init"
        if self.local_rank == 0:
            download_dir(uri, target, dict(self.spec.checkpoint.storage_options))
        self.barrier()
        return download_dir(uri, target) if "://" not in uri or uri.startswith("file://") else target

    def build_tokenizer(self, store: CheckpointStore, init_dir: Path | None = None) -> Any:
        """The job's tokenizer, kept beside its checkpoints so that every resume (and every
        node) tokenizes exactly as the first run did. Rank 0 builds or fetches it. A model
        initialised from an export brings its own tokenizer, which then wins."""
        from transformers import AutoTokenizer

        if init_dir is not None and (init_dir / "tokenizer.json").exists() and self.spec.tokenizer.type != "pretrained":
            return AutoTokenizer.from_pretrained(str(init_dir))
        tok_dir = self.workdir / "tokenizer"
        if self.rank == 0:
            # A stored tokenizer is trusted only with a checkpoint to go with it: one left by a run
            # that failed before its first checkpoint (an empty corpus) is rebuilt from this data.
            if (
                store.exists("tokenizer/tokenizer.json")
                and self.spec.checkpoint.resume != "never"
                and store.complete_steps()
            ):
                download_dir(f"{store.uri}/tokenizer", tok_dir, store.options, into=True)
            else:
                sample = text_sample(self.spec.data, self.spec.tokenizer.sample_bytes)
                save(build_tokenizer(self.spec.tokenizer, sample), tok_dir)
                store.upload_dir(tok_dir, "tokenizer")
        self.barrier()
        if self.local_rank == 0 and self.rank != 0:
            download_dir(f"{store.uri}/tokenizer", tok_dir, store.options, into=True)
        self.barrier()
        return AutoTokenizer.from_pretrained(str(tok_dir))

    def build_data(self, tokenizer: Any) -> tuple[PackedSplit, PackedSplit]:
        """Packed shards in the node-local cache: prepared by rank 0 (or fetched from
        data.cacheUri when an earlier run put them there), then read by every local rank."""
        cache = self.workdir / "data"
        fp = fingerprint(tokenizer)
        remote = self.spec.data.cache_uri
        if self.local_rank == 0:
            path = prepare_cached(self.spec.data, tokenizer, fp, cache, remote, publish=self.rank == 0)
        self.barrier()
        if self.local_rank != 0:
            path = prepare_cached(self.spec.data, tokenizer, fp, cache, remote, publish=False)
        return PackedSplit(path, "train"), PackedSplit(path, "val")

    def build_engine(self, model: Any, *, load_universal: bool = False) -> Any:
        import deepspeed
        import torch

        cfg = deepspeed_config(self.spec, self.world, gpu=self.gpu)
        if load_universal:
            cfg["checkpoint"] = {"load_universal": True}  # read only by load_checkpoint
        o = self.spec.training.optimizer
        groups = parameter_groups(model, o.weight_decay)
        self._groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]

        def schedule(optimizer: Any) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, self.spec))

        optimizer = None
        if "optimizer" not in cfg:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=schedule, config=cfg
        )
        return engine

    def store(self) -> CheckpointStore:
        c = self.spec.checkpoint
        uri = c.uri or str(self.workdir / "checkpoints")
        return CheckpointStore(
            uri, workdir=self.workdir, node_rank=self.node_rank, nodes=self.world // self.local_world,
            storage_options=dict(c.storage_options), keep_last=c.keep_last, keep_every=c.keep_every,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def start_choice(self, store: CheckpointStore) -> int | None:
        """The checkpoint step to resume from (None: a fresh start), decided by rank 0 with the
        store's start policy and told to every rank; a refusal stops every rank with its reason."""
        choice: tuple[int | None, list[str], str | None] = (None, [], None)
        if self.rank == 0:
            try:
                store.acquire_lease(self.lease_holder())
                step, notes = store.start_policy(self.spec.checkpoint.resume)
                choice = (step, notes, None)
            except CheckpointError as e:
                choice = (None, [], str(e))
        step, notes, error = self.broadcast(choice)
        if error:
            raise CheckpointError(error)
        for note in notes:
            if self.rank == 0:
                log.warning("resume: %s; falling back to an older checkpoint", note)
        return None if step is None else int(step)

    def lease_holder(self) -> str:
        """Who this run is, for the checkpoint lease: the same for every restart of one job (so a
        restarted job takes its own lease over at once) and different for any other run."""
        uid = os.environ.get("PRETRAIN_JOB_UID")
        if uid:
            namespace = os.environ.get("POD_NAMESPACE", self.job.metadata.namespace or "default")
            return f"job {namespace}/{self.job.metadata.name} (uid {uid})"
        return f"local run {socket.gethostname()}:{self.workdir.resolve()}"

    def resume_mode(self, store: CheckpointStore, step: int | None) -> universal.ResumeMode | None:
        """Whether checkpoint `step` loads as it is or through its universal form (another
        world size or ZeRO stage), or raise when it cannot load here at all."""
        if step is None:
            return None
        manifest = store.manifest(step) or {}
        mode, problem = universal.resume_mode(
            manifest.get("world_size"), manifest.get("zero_stage"), self.world, self.spec.training.zero.stage,
            checkpoint=step_name(step),
        )  # fmt: skip
        if problem:
            raise CheckpointError(problem)
        return mode

    def universal_copy(self, store: CheckpointStore, step: int) -> Path:
        """Checkpoint `step` in the universal format, node-local: the one stored beside it when it
        verifies, else converted now by rank 0 and published (once: later resizes reuse it)."""
        rel = f"{step_name(step)}/{universal.UNIVERSAL}"
        local = store.local_copy(step) / universal.UNIVERSAL
        error = None
        if self.rank == 0:
            try:
                problem = store.verify_folder(rel, into=local)
                if problem is None:
                    log.info("resume: %s/%s, converted earlier, verified", store.uri, rel)
                else:
                    manifest = store.manifest(step) or {}
                    store.remove_folder(rel)
                    seconds = universal.convert(store.local_copy(step), local)
                    nbytes = store.publish_folder(local, rel, {
                        "step": step, "from_world_size": manifest.get("world_size"),
                        "from_zero_stage": manifest.get("zero_stage"), "convert_seconds": round(seconds, 3),
                    })  # fmt: skip
                    self.reshard = {"event": "reshard", "step": step, "seconds": seconds, "bytes": nbytes,
                                    "from_world_size": manifest.get("world_size"), "world_size": self.world,
                                    "from_zero_stage": manifest.get("zero_stage"),
                                    "zero_stage": self.spec.training.zero.stage}  # fmt: skip
                    log.info(
                        "resume: converted %s (%s processes, ZeRO-%s) to the universal format for %d processes at "
                        "ZeRO-%d in %.1fs (%.1f MB, kept beside it for later resizes)", step_name(step),
                        manifest.get("world_size"), manifest.get("zero_stage"), self.world,
                        self.spec.training.zero.stage, seconds, nbytes / 1e6,
                    )  # fmt: skip
            except Exception as e:  # one line for every rank, not a hang at the next barrier
                error = (
                    f"{step_name(step)}: converting it for {self.world} processes failed: {e.__class__.__name__}: {e}"
                )
        error = self.broadcast(error)
        if error:
            raise CheckpointError(error)
        if self.local_rank == 0 and self.rank != 0:
            problem = store.verify_folder(rel, into=local)
            if problem:
                raise CheckpointError(f"{rel}: {problem}")
        self.barrier()
        return local

    def resume(
        self, engine: Any, store: CheckpointStore, loader: DistributedLoader, step: int | None,
        mode: universal.ResumeMode | None,
    ) -> int:  # fmt: skip
        """Load checkpoint `step` (chosen by `start_choice`); return the step to start at."""
        if step is None:
            return 0
        if self.local_rank == 0 and self.rank != 0:
            problem = store.verify(step, into=store.local_copy(step))
            if problem:
                raise CheckpointError(f"{step_name(step)}: {problem}")
        self.barrier()
        local = store.local_copy(step)
        if mode == "universal":
            folder = self.universal_copy(store, step)
            t0 = time.perf_counter()
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True)
            universal.repair_after_load(engine, self._groups)
            if self.reshard is not None:
                self.reshard["load_seconds"] = time.perf_counter() - t0
        else:
            load_path, _ = engine.load_checkpoint(str(local.parent), tag=local.name, load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"{step_name(step)}: DeepSpeed could not load it")
        state = json.loads((local / "loader.json").read_text())
        loader.load_state_dict(state["loader"])
        rng_file = local / f"rng-rank-{self.rank}.pt"
        if rng_file.exists():
            import torch

            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        if self.rank == 0:
            log.info("resumed from %s/%s (step %d)", store.uri, step_name(step), step)
        return int(state["step"])

    def save(
        self, engine: Any, store: CheckpointStore, loader: DistributedLoader, step: int, *, background: bool = True
    ) -> None:
        import torch

        store.wait()  # at most one upload in flight
        lost = self.broadcast(store.lease_problem() if self.rank == 0 else None)
        if lost:
            raise CheckpointError(f"{lost}: another run writes {store.uri}; stopping without saving step {step}")
        # The history goes up before this checkpoint can be committed: whatever attempt resumes
        # from it finds the curves up to it.
        self.history.sync()
        staging = store.staging_dir(step)
        try:
            engine.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)
            if self.rank == 0:
                (staging / "loader.json").write_text(json.dumps({"step": step, "loader": loader.state_dict()}))
                (staging / "job.json").write_text(self.job.model_dump_json(by_alias=True, exclude_none=True))
            torch.save(
                {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                staging / f"rng-rank-{self.rank}.pt",
            )
        except Exception:
            full = out_of_space(staging)
            if full is None:
                raise
            # The unfinished step has no manifest: nothing loads it, and the next run removes it.
            raise CheckpointError(
                f"cannot save checkpoint {step_name(step)}: {full}; free space (or lower checkpoint.keepLast) and run "
                "again: it resumes from the last complete checkpoint"
            ) from None
        self.barrier()
        meta = {"world_size": self.world, "zero_stage": self.spec.training.zero.stage, "job": self.job.metadata.name}
        store.commit(
            step, writes_manifest=self.rank == 0, uploads=self.local_rank == 0, meta=meta, background=background
        )

    def export(self, engine: Any, tokenizer: Any, store: CheckpointStore, evaluation: dict[str, float]) -> str | None:
        """Write a plain Hugging Face directory to <checkpoint.uri>/final (rank 0 writes)."""
        if self.spec.training.zero.stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict() if self.rank == 0 else None
        uri = None
        if self.rank == 0:
            out = self.workdir / "final"
            model = engine.module
            model.save_pretrained(str(out), state_dict={k: v.detach().cpu() for k, v in state.items()})
            tokenizer.save_pretrained(str(out))
            (out / "metrics.json").write_text(json.dumps(evaluation, indent=1))
            uri = store.upload_dir(out, "final")
        self.barrier()
        return uri

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, engine: Any, batches: list[np.ndarray[Any, Any]], collate: Collator) -> float | None:
        import torch
        import torch.distributed as dist

        if not batches:
            return None
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, rows in enumerate(batches):
                batch = self.to_device(collate(rows, step=EVAL_MASK_STREAM, rank=self.rank, micro=i))
                total[0] += float(engine(**batch).loss)
                total[1] += 1
        engine.train()
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def to_device(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        import torch

        device = torch.device("cuda", self.local_rank) if self.gpu else torch.device("cpu")
        return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        import torch

        t = self.spec.training
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.init_distributed()
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)

        store = self.store()
        try:
            return self.train(store)
        finally:
            store.release_lease()  # on every exit path this process lives through

    def train(self, store: CheckpointStore) -> int:
        import torch
        import torch.distributed as dist

        spec = self.spec
        t = spec.training
        start_choice = self.start_choice(store)  # before anything is written beside the checkpoints
        init_dir = self.fetch_init()
        tokenizer = self.build_tokenizer(store, init_dir)
        names: list[str] | None = None
        train_split: Any
        val_split: Any
        if spec.objective.fine_tuning:
            if init_dir is None and self.rank == 0:
                log.warning(
                    "objective %s without model.initFrom: the task trains from random weights", spec.objective_type
                )
            train_split, val_split, names = labeled.load(spec.objective, spec.data, tokenizer, t.seed)
        else:
            train_split, val_split = self.build_data(tokenizer)
        plan = batch_plan(spec, self.world)
        loader = DistributedLoader(
            train_split, rank=self.rank, world_size=self.world, micro_batch=plan.micro_batch,
            accumulation=plan.accumulation, seed=spec.data.shuffle_seed, weights=[s.weight for s in spec.data.sources],
        )  # fmt: skip
        collate = Collator(
            objective=spec.objective_type, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
            special_ids=tuple(tokenizer.all_special_ids), mask_probability=spec.objective.mask_probability, seed=t.seed,
        )  # fmt: skip
        val = (
            []
            if spec.objective.fine_tuning
            else eval_batches(
                val_split, rank=self.rank, world_size=self.world, micro_batch=plan.micro_batch, steps=t.eval_steps
            )
        )

        model = build_model(spec, tokenizer, init_dir, names)
        n_params = sum(p.numel() for p in model.parameters())
        mode = self.resume_mode(store, start_choice)
        engine = self.build_engine(model, load_universal=mode == "universal")
        steps = total_steps(spec) or 1
        start = self.resume(engine, store, loader, start_choice, mode)

        seq = spec.data.sequence_length
        tokens_per_step = plan.global_batch * seq
        cfg = model.config
        flops_per_token = model_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, seq)
        peak = spec.monitoring.peak_flops or (
            peak_flops_for(torch.cuda.get_device_name(self.local_rank)) if self.gpu else None
        )
        metrics = TrainerMetrics(
            Labels(self.job.metadata.name, self.job.metadata.namespace or "default", self.rank, self.attempt),
            spec.monitoring.metrics_port + self.local_rank,
            # One pod per host in a cluster binds all addresses; tests running several "nodes"
            # on one machine give each its own loopback address.
            addr=os.environ.get("PRETRAIN_METRICS_HOST", "0.0.0.0"),
        )
        metrics.total_steps.set(steps)
        metrics.step.set(start)
        progress = Progress(total=steps, start=start, enabled=self.rank == 0)
        self.history = RunHistory(store.uri, self.workdir, store.options, enabled=self.rank == 0,
                                  tensorboard=spec.monitoring.tensorboard)  # fmt: skip
        self._last_checkpoint_logged = store.stats.last_verified_step
        self.history.log({"event": "start", "step": start, "attempt": self.attempt, "world_size": self.world,
                          "job": self.job.model_dump(by_alias=True, exclude_none=True, mode="json")})  # fmt: skip
        if self.reshard is not None:
            self.history.log(self.reshard)
        if self.rank == 0:
            log.info(
                "job %s: %s %.2fM params, %d processes, ZeRO-%d %s, %d steps of %d x %d tokens (accumulation %d)%s",
                self.job.metadata.name, spec.model.family, n_params / 1e6, self.world, t.zero.stage, t.precision,
                steps, plan.global_batch, seq, plan.accumulation, f", resuming at step {start}" if start else "",
            )  # fmt: skip
            if metrics.port:
                log.info("metrics: http://127.0.0.1:%d/metrics", metrics.port)

        last_saved = start if start else None
        step = start
        loss = float("nan")
        while step < steps:
            t0 = time.perf_counter()
            batches = loader.next_step()
            metrics.data_wait.inc(time.perf_counter() - t0)
            local_loss = 0.0
            for m, rows in enumerate(batches):
                batch = self.to_device(collate(rows, step=step, rank=self.rank, micro=m))
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
                local_loss += float(out.loss.detach())
            reduced = torch.tensor([local_loss / len(batches), float(self.stop_requested)], dtype=torch.float64)
            dist.all_reduce(reduced)
            loss = float(reduced[0]) / self.world
            stop = reduced[1] > 0
            step += 1
            seconds = time.perf_counter() - t0
            lr = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            mfu = (flops_per_token * tokens_per_step / self.world / seconds / peak) if peak else None
            metrics.observe_step(
                step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens_per_step, samples=plan.global_batch,
                seconds=seconds, mfu=mfu,
            )  # fmt: skip
            if self.gpu:
                metrics.observe_memory(torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
            elif step % t.log_interval == 0 or step == start + 1:
                rss = resident_bytes()
                metrics.observe_memory(rss, rss)
            progress.update(step, loss=loss, tokens_per_second=tokens_per_step / seconds, lr=lr)
            self.record({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_per_step,
                         "seconds": seconds, "epoch": loader.epoch})  # fmt: skip
            if self.rank == 0 and (step % t.log_interval == 0 or step == steps or step == start + 1):
                progress.log(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_second=tokens_per_step / seconds)
                self.history.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens_per_second": tokens_per_step / seconds, "mfu": mfu})  # fmt: skip
            if t.eval_interval and step % t.eval_interval == 0 and step < steps:
                self.run_eval(engine, step, val, val_split, collate, names, metrics, progress)
            if step % spec.checkpoint.interval_steps == 0 or stop:
                self.save(engine, store, loader, step)
                last_saved = step
            self.report_checkpoint(store, metrics)
            if stop:
                store.close()
                self.report_checkpoint(store, metrics)
                progress.close()
                self.report_stop(step, metrics)
                metrics.close()
                return 0

        progress.close()
        final_eval = self.run_eval(engine, step, val, val_split, collate, names, metrics, progress)
        eval_loss = final_eval.get("loss")
        if last_saved != step:
            self.save(engine, store, loader, step, background=False)
        store.close()
        self.report_checkpoint(store, metrics)
        self.check_checkpoint_errors(store)
        self.history.close()
        uri = self.export(engine, tokenizer, store, final_eval)
        if self.rank == 0:
            summary = {"step": step, "train_loss": loss, "eval_loss": eval_loss, "final": uri,
                       "eval": {k: v for k, v in final_eval.items() if k != "loss"}}  # fmt: skip
            log.info("done: %s", json.dumps({**summary, "final": shown(uri) if uri else None}))
            # No NaN in result.json (a run resumed at its last step trained no step): null instead.
            clean = json.loads(json.dumps(summary), parse_constant=lambda _: None)
            (self.workdir / "result.json").write_text(json.dumps(clean, allow_nan=False))
            saved = store.stats.last_verified_step
            write_done({"step": step, "totalSteps": steps, "trainLoss": clean["train_loss"], "checkpointStep": saved,
                        "checkpointTime": iso_time(store.stats.last_verified_time)})  # fmt: skip
        metrics.close()
        return 0

    def report_stop(self, step: int, metrics: TrainerMetrics) -> None:
        """After the checkpoint a SIGTERM asked for: how long it took from the signal, against the
        pod's grace period (a save that does not fit is killed half-way and the work since the
        previous checkpoint is lost), in the log, a metric and the run's history."""
        seconds = time.monotonic() - self.signalled_at if self.signalled_at is not None else None
        grace = float(os.environ.get("PRETRAIN_TERMINATION_GRACE_SECONDS") or 0) or None
        if seconds is not None:
            metrics.stop_save.set(seconds)
            self.history.log({"event": "stop", "step": step, "seconds": seconds, "grace_seconds": grace})
        self.history.close()
        if self.rank != 0:
            return
        took = f" {seconds:.1f}s after the signal" if seconds is not None else ""
        log.info(
            "stopped at step %d on request; checkpoint %s saved%s; run again to resume", step, step_name(step), took
        )
        if seconds is not None and grace and seconds > 0.8 * grace:
            log.warning(
                "the checkpoint on SIGTERM took %.0fs of the pod's %.0fs grace period: raise "
                "resources.terminationGracePeriodSeconds", seconds, grace,
            )  # fmt: skip

    def record(self, entry: dict[str, Any], *, durable: bool = False) -> None:
        """Append one line to rank 0's train_log.jsonl (this attempt's own record of every step,
        read by tests and tools); `durable` records also go to the run's metrics.jsonl."""
        if self.rank == 0:
            with open(self.workdir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if durable:
            self.history.log(entry)

    def run_eval(self, engine: Any, step: int, val: list[np.ndarray[Any, Any]], val_split: Any, collate: Collator,
                 names: list[str] | None, metrics: TrainerMetrics, progress: Progress) -> dict[str, float]:  # fmt: skip
        """Evaluate now: loss and perplexity for language modelling, task metrics for fine-tuning."""
        if not self.spec.objective.fine_tuning:
            loss = self.log_eval(step, self.evaluate(engine, val, collate), metrics, progress)
            return {} if loss is None else {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if len(val_split) == 0:
            return {}
        engine.eval()
        scores = tasks.evaluate(
            engine, val_split, self.spec.objective, names or [], rank=self.rank, world=self.world,
            micro_batch=self.spec.training.micro_batch_size, to_device=self.to_device,
        )  # fmt: skip
        engine.train()
        self.record(
            {"step": step, "eval_loss": scores["loss"], **{f"eval_{k}": v for k, v in scores.items() if k != "loss"}},
            durable=True,
        )
        metrics.eval_loss.set(scores["loss"])
        metrics.observe_eval(scores)
        if self.rank == 0:
            progress.clear()
            log.info("eval step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    def log_eval(self, step: int, eval_loss: float | None, metrics: TrainerMetrics, progress: Progress) -> float | None:
        if eval_loss is None:
            return None
        ppl = math.exp(min(eval_loss, 50.0))
        self.record({"step": step, "eval_loss": eval_loss, "eval_perplexity": ppl}, durable=True)
        metrics.eval_loss.set(eval_loss)
        metrics.eval_perplexity.set(ppl)
        if self.rank == 0:
            progress.clear()
            log.info("eval step %d: loss %.4f perplexity %.2f", step, eval_loss, ppl)
        return eval_loss

    def report_checkpoint(self, store: CheckpointStore, metrics: TrainerMetrics) -> None:
        s = store.stats
        metrics.observe_checkpoint(
            seconds=s.last_seconds, nbytes=s.last_bytes, failures=s.failures, step=s.last_verified_step,
            when=s.last_verified_time,
        )  # fmt: skip
        if s.last_verified_step is not None and s.last_verified_step != self._last_checkpoint_logged:
            self._last_checkpoint_logged = s.last_verified_step
            # durable with the next checkpoint's history upload (save) or at the end (close)
            self.history.log({"event": "checkpoint", "step": s.last_verified_step, "seconds": s.last_seconds,
                              "bytes": s.last_bytes})  # fmt: skip
        if s.failures and self.spec.checkpoint.fail_on_error:
            self.check_checkpoint_errors(store)

    def check_checkpoint_errors(self, store: CheckpointStore) -> None:
        if store.stats.failures and self.spec.checkpoint.fail_on_error:
            raise CheckpointError(f"checkpoint failed and checkpoint.failOnError is set: {store.stats.errors[-1]}")
        if store.stats.failures and self.rank == 0:
            log.warning("%d checkpoint save(s) failed: %s", store.stats.failures, store.stats.errors[-1])


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )  # fmt: skip
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for noisy in (
        "DeepSpeed",
        "deepspeed",
        "torch.distributed",
        "urllib3",
        "botocore",
        "s3fs",
        "aiobotocore",
        "fsspec",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def iso_time(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if epoch else None
