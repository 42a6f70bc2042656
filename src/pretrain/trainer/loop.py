"""The training loop: one job spec in, a trained, checkpointed, exported model out.

`Trainer.run` reads top to bottom: distributed set-up; `setup()` builds the parts (tokenizer,
data, model, DeepSpeed engine, the checkpoint's state loaded into them); the step loop
(`train_step`, losses read back at sync points, log, evaluate, checkpoint) until the last step
or a stop request; then the final checkpoint and export. Every resource the run opens (metrics
server, upload pool, progress line, history) is closed on every path by one ExitStack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from pretrain.api.spec import PretrainJob
from pretrain.clitools import shown
from pretrain.contract import ENV_METRICS_HOST, ENV_TERMINATION_GRACE
from pretrain.metrics.history import RunHistory
from pretrain.metrics.mlflow import MlflowMirror, RunFile
from pretrain.metrics.trainer import Labels, TrainerMetrics
from pretrain.storage.manifest import step_name
from pretrain.termination import write_done
from pretrain.timestamps import from_epoch
from pretrain.trainer.checkpointer import Checkpointer, open_store
from pretrain.trainer.extensions import build_cpu_op, seed_extension_cache
from pretrain.trainer.guard import Finding, GuardError, LossGuard, fault_from_env
from pretrain.trainer.progress import Progress
from pretrain.trainer.recipe import mfu as model_flops_utilisation
from pretrain.trainer.setup import Parts, compile_enabled, setup
from pretrain.trainer.step import StepCall, StepResult, StepSync, train_step
from pretrain.trainer.watchdog import Watchdog
from pretrain.trainer.world import World

log = logging.getLogger("pretrain.trainer")


def quietly(fn: Callable[[], Any], what: str) -> Callable[[], None]:
    """`fn` for an error path: a failure is logged, not raised over the error being handled."""

    def call() -> None:
        try:
            fn()
        except Exception as e:
            log.warning("while stopping: %s failed: %s: %s", what, e.__class__.__name__, e)

    return call


class Trainer:
    def __init__(self, job: PretrainJob, workdir: Path) -> None:
        self.job, self.spec, self.workdir = job, job.spec, workdir
        self.world = World.from_env(gpu=self.spec.resources.accelerator == "gpu")
        self.rank = self.world.rank
        self.stop_requested = False
        self.signalled_at: float | None = None  # when SIGTERM/SIGINT came (time.monotonic)
        self.history = RunHistory.off(workdir)
        self.last_loss = float("nan")  # of the last step read back
        self.last_saved: int | None = None
        self.guard = LossGuard(self.spec.training.guard)
        self.began = time.monotonic()  # the process's start: until the first step, restart overhead
        #: Where this process's time went (goodput.py's trainer parts), for the metric and the summary.
        self.spent: dict[str, float] = {}
        self.max_step = 0  # the furthest step this process trained: a step at or below it is trained again
        self.fault = fault_from_env()  # tests only
        # Opened by run():
        self.checkpointer: Checkpointer
        self.metrics: TrainerMetrics
        self.progress: Progress
        self.sync: StepSync

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stop_requested:
            self.signalled_at = time.monotonic()
            log.warning(
                "received %s: saving a checkpoint at the end of this step, then exiting", signal.Signals(signum).name
            )
        self.stop_requested = True

    def init_distributed(self) -> None:
        import torch

        if self.world.gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.accelerator is gpu but no CUDA device is visible; use accelerator: cpu")
            torch.cuda.set_device(self.world.local_rank)
        else:
            seed_extension_cache()  # DeepSpeed's CPU op, compiled into the image, instead of a 30 s build
            build_cpu_op()  # or built here, one process at a time, past any build killed before
        import deepspeed

        deepspeed.init_distributed(verbose=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        seed = self.spec.training.seed
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.init_distributed()
        # Closed on every path, last opened first. On an error path nothing here waits on the
        # other ranks (they may be gone) or writes beside the checkpoints but the upload in flight.
        with contextlib.ExitStack() as closing:
            # Served from the start: while the store or the data cannot be reached, the operator
            # reads that here (the storage call being retried) instead of seeing pods that run.
            self.metrics = self.open_metrics()
            closing.callback(self.metrics.close)
            store = open_store(self.job, self.workdir, self.world)
            self.checkpointer = Checkpointer(self.job, self.workdir, self.world, store)
            closing.callback(store.release_lease)  # on every exit path this process lives through
            closing.callback(quietly(store.close, "waiting for the checkpoint upload"))
            parts = setup(self.job, self.workdir, self.world, self.checkpointer)
            self.metrics.begin(parts.steps, parts.start)
            self.progress = Progress(total=parts.steps, start=parts.start, enabled=self.rank == 0)
            closing.callback(self.progress.close)
            self.history = RunHistory(store.uri, self.workdir, store.options, enabled=self.rank == 0,
                                      tensorboard=self.spec.monitoring.tensorboard)  # fmt: skip
            closing.callback(quietly(lambda: self.history.close(upload=False), "closing the history"))
            if self.rank == 0 and self.spec.monitoring.mlflow is not None:
                run_file = RunFile.beside_checkpoints(store.loc)
                mirror = MlflowMirror(self.spec.monitoring.mlflow, self.job, run_file)
                self.history.mirror = mirror.start(self.history.records(), parts.start)
            self.checkpointer.attach(self.history)
            self.sync = StepSync(self.world)
            self.announce(parts)
            self.watchdog = Watchdog(self.spec.run_policy.stall_timeout_seconds, self.rank).start()
            closing.callback(self.watchdog.stop)
            self.progressed()
            step, stopped = self.train(parts)
            self.sync.close()
            return self.stop(step) if stopped else self.finish(parts, step)

    def open_metrics(self) -> TrainerMetrics:
        return TrainerMetrics(
            Labels(self.job.metadata.name, self.job.metadata.namespace or "default", self.rank, self.world.attempt),
            self.spec.monitoring.metrics_port + self.world.local_rank,
            # One pod per host in a cluster binds all addresses; tests running several "nodes"
            # on one machine give each its own loopback address.
            addr=os.environ.get(ENV_METRICS_HOST, "0.0.0.0"),
        )

    def announce(self, parts: Parts) -> None:
        """The run's first history record and log line."""
        spec, t = self.spec, self.spec.training
        self.history.log({"event": "start", "step": parts.start, "attempt": self.world.attempt,
                          "world_size": self.world.size,
                          "job": self.job.model_dump(by_alias=True, exclude_none=True, mode="json")})  # fmt: skip
        if self.checkpointer.reshard is not None:
            self.history.log(self.checkpointer.reshard)
        if self.rank != 0:
            return
        log.info(
            "job %s: %s %.2fM params, %d processes, ZeRO-%d %s%s, %d steps of %d x %d tokens (accumulation %d)%s",
            self.job.metadata.name, spec.model.family, parts.n_params / 1e6, self.world.size, t.zero.stage,
            t.precision, ", compiled" if compile_enabled(spec) else "", parts.steps, parts.plan.global_batch,
            spec.data.sequence_length, parts.plan.accumulation, f", resuming at step {parts.start}" if parts.start else "",
        )  # fmt: skip
        if self.metrics.port:
            log.info("metrics: http://127.0.0.1:%d/metrics", self.metrics.port)

    def train(self, parts: Parts) -> tuple[int, bool]:
        """Steps from `parts.start` to the last, or to an agreed stop; returns (step, stopped)."""
        t, ckpt = self.spec.training, self.spec.checkpoint
        step = self.max_step = parts.start
        self.last_saved = parts.start or None
        stop = False
        self.spend("restart", time.monotonic() - self.began)
        while step < parts.steps and not stop:
            t0 = time.perf_counter()
            batches = parts.loader.next_step()
            self.metrics.data_wait.inc(time.perf_counter() - t0)
            call = StepCall(step, self.rank, self.world.to_device, self.fault.factor_at(step + 1) if self.fault else None,
                            self.skip_judge(parts))  # fmt: skip
            loss = train_step(parts.engine, batches, parts.collate, call)
            step += 1
            stop, sync = self.sync.exchange(self.stop_requested)
            seconds = time.perf_counter() - t0
            self.spend("recomputed" if step <= self.max_step else "training", seconds)
            self.max_step = max(self.max_step, step)
            self.progressed(seconds)
            if step == parts.start + 1 and compile_enabled(self.spec) and self.rank == 0:
                log.info("compiled the model in its first step: %.1fs", seconds)
            self.sync.add(StepResult(step, loss, parts.engine.get_lr()[0], parts.engine.get_global_grad_norm(),
                                     seconds, parts.loader.epoch, dict(parts.loader.source_rows),
                                     parts.gate.skipped() if parts.gate else None))  # fmt: skip
            evaluate = bool(t.eval_interval) and step % t.eval_interval == 0 and step < parts.steps
            save = step % ckpt.interval_steps == 0 or stop
            if sync or stop or evaluate or save or step % t.log_interval == 0 or step == parts.steps:
                rows = self.sync.flush()
                self.report_steps(parts, rows)
                back_to = self.guarded(parts, rows)
                if back_to is not None:
                    step = back_to
                    continue
            if evaluate:
                self.evaluate(parts, step)
                self.progressed()
            if save:
                t1 = time.monotonic()
                self.checkpointer.save(parts.engine, parts.loader, step)
                self.spend("checkpoint", time.monotonic() - t1)
                self.last_saved = step
                self.progressed()
            self.checkpointer.report(self.metrics)
        return step, stop

    def skip_judge(self, parts: Parts) -> Callable[[Any], None] | None:
        """With action skip: what judges a step's local mean loss before its update (averaged over
        every rank first, on the device: every rank decides alike)."""
        gate, world = parts.gate, self.world
        if gate is None:
            return None
        return lambda local: gate.judge(world.all_reduce(local.clone()) / world.size)

    def guarded(self, parts: Parts, rows: list[dict[str, Any]]) -> int | None:
        """The loss guard over read-back rows: each skipped step said (action skip), or the first
        bad step acted on; the step to go on from after a rollback, else None."""
        if self.spec.training.guard.action == "skip":
            for skipped in self.guard.skipped(rows):
                self.on_finding(parts, skipped)
            return None
        finding = self.guard.check(rows)
        if finding is None or not self.on_finding(parts, finding):
            return None
        t1 = time.monotonic()
        step = self.roll_back(parts, finding)
        self.spend("restart", time.monotonic() - t1)
        self.progressed()  # reloading a checkpoint is progress, however long it took
        return step

    def on_finding(self, parts: Parts, finding: Finding) -> bool:
        """Report what the loss guard found, everywhere; True when the run rolls back (else it
        goes on, or GuardError ends it in one line)."""
        action = self.spec.training.guard.action
        what = f"training.guard: {finding.kind} loss at step {finding.step} ({finding.detail})"
        self.metrics.observe_guard(finding.kind, finding.step)
        self.history.log({"event": "guard", "step": finding.step, "kind": finding.kind, "action": action,
                          "loss": finding.loss if math.isfinite(finding.loss) else str(finding.loss)})  # fmt: skip
        if action == "warn":
            log.warning("%s; going on (action warn)", what)
            return False
        if action == "fail":
            raise GuardError(f"{what}; failing (action fail)")
        refused = self.guard.allow_rollback(finding.step)
        if refused:
            raise GuardError(f"{what}; {refused}: failing")
        if action == "skip":
            log.warning("%s; its update was left out (action skip)", what)
            return False
        return True

    def roll_back(self, parts: Parts, finding: Finding) -> int:
        """Reload the newest checkpoint and skip the data trained on since, through the bad
        step; the step to go on from."""
        store = self.checkpointer.store
        store.wait()  # an upload in flight may be the newest checkpoint
        to = store.stats.last_verified_step
        what = f"training.guard: {finding.kind} loss at step {finding.step}"
        if to is None:
            raise GuardError(f"{what}; no checkpoint to roll back to (lower checkpoint.intervalSteps): failing")
        if self.checkpointer.resume_mode(to) != "direct":
            raise GuardError(f"{what}; the newest checkpoint, {step_name(to)}, is from another world size or ZeRO "
                             "stage and loads only at a restart: failing (a restart resumes from it)")  # fmt: skip
        position = parts.loader.consumed
        self.checkpointer.load(parts.engine, parts.loader, to, "direct", [])
        left_out = parts.loader.skip_to(position)
        self.last_saved = to
        self.metrics.step.set(to)
        self.history.log({"event": "rollback", "step": finding.step, "to_step": to, "kind": finding.kind,
                          "skipped_positions": list(left_out)})  # fmt: skip
        log.warning("%s: rolled back to %s and left out the data of the steps since (stream positions %d to %d)",
                    what, step_name(to), *left_out)  # fmt: skip
        return to

    def progressed(self, step_seconds: float | None = None) -> None:
        """Progress (a step of `step_seconds`, or an evaluation or checkpoint): the watchdog's beat."""
        self.watchdog.beat(step_seconds)
        self.metrics.observe_heartbeat(time.time(), self.watchdog.limit)

    def report_steps(self, parts: Parts, rows: list[dict[str, Any]]) -> None:
        """Metrics, progress, train_log.jsonl and (at log steps) the log line and history for
        steps read back together."""
        spec, t = self.spec, self.spec.training
        tokens = parts.plan.global_batch * spec.data.sequence_length
        peak = parts.peak_flops
        for row in rows:
            step, seconds = row["step"], row["seconds"]
            self.last_loss = row["loss"]
            mfu = model_flops_utilisation(parts.flops_per_token, tokens / seconds, self.world.size, peak)
            self.metrics.observe_step(step=step, loss=row["loss"], lr=row["lr"], grad_norm=row["grad_norm"],
                                      tokens=tokens, samples=parts.plan.global_batch, seconds=seconds, mfu=mfu)  # fmt: skip
            by_source = self.source_tokens(row.pop("source_rows", None))
            self.metrics.observe_sources(by_source)
            self.progress.update(step, loss=row["loss"], tokens_per_second=tokens / seconds, lr=row["lr"])
            self.record({**row, "tokens": tokens})
            if self.rank == 0 and (step % t.log_interval == 0 or step == parts.steps or step == parts.start + 1):
                self.progress.log(step, loss=row["loss"], lr=row["lr"], grad_norm=row["grad_norm"],
                                  tokens_per_second=tokens / seconds, mfu=mfu)  # fmt: skip
                self.history.log({"step": step, "loss": row["loss"], "lr": row["lr"], "grad_norm": row["grad_norm"],
                                  "tokens_per_second": tokens / seconds, "mfu": mfu,
                                  "time_spent": {k: round(v, 3) for k, v in self.spent.items()},
                                  **({"source_tokens": by_source} if by_source else {})})  # fmt: skip
        self.observe_memory()

    def source_tokens(self, rows: dict[int, int] | None) -> dict[str, int]:
        """Tokens trained on by source URI (training sources only), from the loader's row count."""
        sources, seq = self.spec.data.sources, self.spec.data.sequence_length
        return {sources[i].uri: n * seq for i, n in sorted((rows or {}).items()) if i < len(sources)}

    def observe_memory(self) -> None:
        if self.world.gpu:
            import torch

            self.metrics.observe_memory(torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
        else:
            rss = resident_bytes()
            self.metrics.observe_memory(rss, rss)

    def spend(self, kind: str, seconds: float) -> None:
        """Time of this process by kind (goodput), as a metric and for the final summary."""
        self.spent[kind] = self.spent.get(kind, 0.0) + seconds
        self.metrics.observe_time(kind, seconds)

    def evaluate(self, parts: Parts, step: int) -> dict[str, float]:
        """Evaluate now and report it: log, train_log.jsonl and history, metrics."""
        t0 = time.monotonic()
        try:
            return self._evaluate(parts, step)
        finally:
            self.spend("evaluation", time.monotonic() - t0)

    def _evaluate(self, parts: Parts, step: int) -> dict[str, float]:
        scores = parts.evaluator(parts.engine)
        if not scores:
            return {}
        self.record({"step": step, **{f"eval_{k}": v for k, v in scores.items()}}, durable=True)
        self.metrics.eval_loss.set(scores["loss"])
        if "perplexity" in scores:
            self.metrics.eval_perplexity.set(scores["perplexity"])
        else:
            self.metrics.observe_eval(scores)
        if self.rank == 0:
            self.progress.clear()
            shown_scores = (f"{k} {v:.2f}" if k == "perplexity" else f"{k} {v:.4f}" for k, v in scores.items())
            log.info("eval step %d: %s", step, " ".join(shown_scores))
        return scores

    def finish(self, parts: Parts, step: int) -> int:
        """After the last step: final evaluation and checkpoint, export, result files."""
        self.progress.close()
        final_eval = self.evaluate(parts, step)
        self.progressed()
        store = self.checkpointer.store
        t0 = time.monotonic()
        if self.last_saved != step:
            self.checkpointer.save(parts.engine, parts.loader, step, background=False)
        self.watchdog.stop()  # the last upload may outlast any step; its own retries bound it
        store.close()
        self.spend("checkpoint", time.monotonic() - t0)
        self.checkpointer.report(self.metrics)
        self.checkpointer.check_errors()
        uri = self.export(parts, final_eval)
        if uri:
            self.history.log({"event": "export", "step": step, "uri": uri})
        self.history.close()
        if self.rank == 0:
            self.write_result(step, parts.steps, final_eval, uri)
        return 0

    def write_result(self, step: int, steps: int, final_eval: dict[str, float], uri: str | None) -> None:
        """result.json in the work folder, and the termination message a pod leaves."""
        summary = {"step": step, "train_loss": self.last_loss, "eval_loss": final_eval.get("loss"), "final": uri,
                   "eval": {k: v for k, v in final_eval.items() if k != "loss"}}  # fmt: skip
        log.info("done: %s", json.dumps({**summary, "final": shown(uri) if uri else None}))
        # No NaN in result.json (a run resumed at its last step trained no step): null instead.
        clean = json.loads(json.dumps(summary), parse_constant=lambda _: None)
        (self.workdir / "result.json").write_text(json.dumps(clean, allow_nan=False))
        stats = self.checkpointer.store.stats
        write_done({"step": step, "totalSteps": steps, "trainLoss": clean["train_loss"],
                    "checkpointStep": stats.last_verified_step, "checkpointTime": from_epoch(stats.last_verified_time),
                    "time": {k: round(v, 3) for k, v in self.spent.items()}})  # fmt: skip

    def stop(self, step: int) -> int:
        """After the checkpoint a SIGTERM asked for: how long it took from the signal, against the
        pod's grace period (a save that does not fit is killed half-way and the work since the
        previous checkpoint is lost), in the log, a metric and the run's history."""
        self.watchdog.stop()
        self.checkpointer.store.close()
        self.checkpointer.report(self.metrics)
        self.progress.close()
        seconds = time.monotonic() - self.signalled_at if self.signalled_at is not None else None
        grace = float(os.environ.get(ENV_TERMINATION_GRACE) or 0) or None
        if seconds is not None:
            self.metrics.stop_save.set(seconds)
            self.history.log({"event": "stop", "step": step, "seconds": seconds, "grace_seconds": grace})
        self.history.close()
        if self.rank != 0:
            return 0
        store = self.checkpointer.store
        # The manifest decides: a save counts only when its manifest was written and reads back.
        saved = store.stats.last_verified_step == step and store.manifest(step) is not None
        if not saved:
            newest = store.stats.last_verified_step
            error = store.stats.errors[-1] if store.stats.errors else "no manifest"
            log.error(
                "stopped at step %d on request, but checkpoint %s was NOT saved (%s); a rerun resumes from %s", step,
                step_name(step), error, step_name(newest) if newest is not None else "the newest earlier checkpoint",
            )  # fmt: skip
            return 1
        took = f" {seconds:.1f}s after the signal" if seconds is not None else ""
        log.info(
            "stopped at step %d on request; checkpoint %s saved%s; run again to resume", step, step_name(step), took
        )
        if seconds is not None and grace and seconds > 0.8 * grace:
            log.warning(
                "the checkpoint on SIGTERM took %.0fs of the pod's %.0fs grace period: raise "
                "resources.terminationGracePeriodSeconds", seconds, grace,
            )  # fmt: skip
        return 0

    def record(self, entry: dict[str, Any], *, durable: bool = False) -> None:
        """Append one line to rank 0's train_log.jsonl (this attempt's own record of every step,
        read by tests and tools); `durable` records also go to the run's metrics.jsonl."""
        if self.rank == 0:
            with open(self.workdir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if durable:
            self.history.log(entry)

    def export(self, parts: Parts, evaluation: dict[str, float]) -> str | None:
        """Write a plain Hugging Face directory to <checkpoint.uri>/final (rank 0 writes)."""
        engine = parts.engine
        if self.spec.training.zero.stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict() if self.rank == 0 else None
        uri = None
        if self.rank == 0:
            out = self.workdir / "final"
            engine.module.save_pretrained(str(out), state_dict={k: v.detach().cpu() for k, v in state.items()})
            parts.tokenizer.save_pretrained(str(out))
            (out / "metrics.json").write_text(json.dumps(evaluation, indent=1))
            uri = self.checkpointer.store.upload_dir(out, "final")
        self.world.barrier()
        return uri


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
