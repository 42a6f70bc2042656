"""What goes into a checkpoint and how it comes back: the trainer's one owner of the store.

A checkpoint holds four parts, each saved and loaded here and nowhere else:
- the engine (DeepSpeed's model and optimizer shards, one file set per rank);
- the loader's position (`loader.json`, one integer of state plus the step);
- the random state of every rank (`rng-rank-<r>.pt`: torch, numpy, python);
- the job it was written by (`job.json`), for people and tools reading the folder.

The store (`pretrain.storage.checkpoint`) moves and verifies files; this module decides which
checkpoint to start from (rank 0, under the store's lease), whether it loads as it is or through
its universal form (another world size or ZeRO stage), and keeps the metrics and the run's
history told about saves.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import PretrainJob
from pretrain.contract import ENV_JOB_UID
from pretrain.data.loader import DistributedLoader
from pretrain.metrics.history import RunHistory
from pretrain.metrics.trainer import TrainerMetrics
from pretrain.storage.checkpoint import CheckpointError, CheckpointStore
from pretrain.storage.fs import out_of_space
from pretrain.storage.manifest import step_name
from pretrain.trainer import universal
from pretrain.trainer.world import World

log = logging.getLogger("pretrain.trainer")

LOADER_FILE = "loader.json"
JOB_FILE = "job.json"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


def rng_state() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def open_store(job: PretrainJob, workdir: Path, world: World) -> CheckpointStore:
    c = job.spec.checkpoint
    return CheckpointStore(
        c.uri or str(workdir / "checkpoints"), workdir=workdir, node_rank=world.node_rank, nodes=world.nodes,
        storage_options=dict(c.storage_options), keep_last=c.keep_last, keep_every=c.keep_every,
    )  # fmt: skip


class Checkpointer:
    def __init__(self, job: PretrainJob, workdir: Path, world: World, store: CheckpointStore) -> None:
        self.job, self.workdir, self.world, self.store = job, workdir, world, store
        self.history = RunHistory.off(workdir)  # the run's, once it has one
        #: What a resume at another world size or stage cost (rank 0, when it converted).
        self.reshard: dict[str, Any] | None = None
        self._logged_step: int | None = None

    def attach(self, history: RunHistory) -> None:
        """The run's history, told about each new checkpoint from now on."""
        self.history = history
        self._logged_step = self.store.stats.last_verified_step

    # ------------------------------------------------------------------ where to start

    def start_choice(self) -> int | None:
        """The checkpoint step to resume from (None: a fresh start), decided by rank 0 with the
        store's start policy and told to every rank; a refusal stops every rank with its reason."""
        choice: tuple[int | None, list[str], str | None] = (None, [], None)
        if self.world.rank == 0:
            try:
                self.store.acquire_lease(self.lease_holder())
                step, notes = self.store.start_policy(self.job.spec.checkpoint.resume)
                choice = (step, notes, None)
            except CheckpointError as e:
                choice = (None, [], str(e))
        step, notes, error = self.world.broadcast(choice)
        if error:
            raise CheckpointError(error)
        for note in notes:
            if self.world.rank == 0:
                log.warning("resume: %s; falling back to an older checkpoint", note)
        return None if step is None else int(step)

    def lease_holder(self) -> str:
        """Who this run is, for the checkpoint lease: the same for every restart of one job (so a
        restarted job takes its own lease over at once) and different for any other run."""
        uid = os.environ.get(ENV_JOB_UID)
        if uid:
            namespace = os.environ.get("POD_NAMESPACE", self.job.metadata.namespace or "default")
            return f"job {namespace}/{self.job.metadata.name} (uid {uid})"
        return f"local run {socket.gethostname()}:{self.workdir.resolve()}"

    def resume_mode(self, step: int | None) -> universal.ResumeMode | None:
        """Whether checkpoint `step` loads as it is or through its universal form (another
        world size or ZeRO stage), or raise when it cannot load here at all."""
        if step is None:
            return None
        manifest = self.store.manifest(step)
        mode, problem = universal.resume_mode(
            manifest.get("world_size") if manifest else None, manifest.get("zero_stage") if manifest else None, self.world.size,
            self.job.spec.training.zero.stage, checkpoint=step_name(step),
        )  # fmt: skip
        if problem:
            raise CheckpointError(problem)
        return mode

    # ------------------------------------------------------------------ loading

    def fetch(self, rel: str, local: Path, verify: Any) -> None:
        """The other nodes' copy of what rank 0 verified (or made): downloaded and verified by
        each node's local rank 0, then every rank waits for it."""
        if self.world.uploads and self.world.rank != 0:
            problem = verify(rel, into=local)
            if problem:
                raise CheckpointError(f"{rel}: {problem}")
        self.world.barrier()

    def universal_copy(self, step: int) -> Path:
        """Checkpoint `step` in the universal format, node-local: the one stored beside it when it
        verifies, else converted now by rank 0 and published (once: later resizes reuse it)."""
        rel = f"{step_name(step)}/{universal.UNIVERSAL}"
        local = self.store.local_copy(step) / universal.UNIVERSAL
        error = None
        if self.world.rank == 0:
            try:
                if self.store.verify_folder(rel, into=local) is None:
                    log.info("resume: %s/%s, converted earlier, verified", self.store.uri, rel)
                else:
                    self.convert(step, rel, local)
            except Exception as e:  # one line for every rank, not a hang at the next barrier
                error = f"{step_name(step)}: converting it for {self.world.size} processes failed: " + (
                    f"{e.__class__.__name__}: {e}"
                )
        error = self.world.broadcast(error)
        if error:
            raise CheckpointError(error)
        self.fetch(rel, local, self.store.verify_folder)
        return local

    def convert(self, step: int, rel: str, local: Path) -> None:
        """Rank 0: convert `step` to the universal format and publish it beside the step."""
        manifest = self.store.manifest(step)
        source = {"from_world_size": manifest.get("world_size") if manifest else None,
                  "from_zero_stage": manifest.get("zero_stage") if manifest else None}  # fmt: skip
        self.store.remove_folder(rel)
        seconds = universal.convert(self.store.local_copy(step), local)
        nbytes = self.store.publish_folder(local, rel, {"step": step, **source, "convert_seconds": round(seconds, 3)})
        stage = self.job.spec.training.zero.stage
        self.reshard = {"event": "reshard", "step": step, "seconds": seconds, "bytes": nbytes, **source,
                        "world_size": self.world.size, "zero_stage": stage}  # fmt: skip
        log.info(
            "resume: converted %s (%s processes, ZeRO-%s) to the universal format for %d processes at ZeRO-%d in "
            "%.1fs (%.1f MB, kept beside it for later resizes)", step_name(step), source["from_world_size"],
            source["from_zero_stage"], self.world.size, stage, seconds, nbytes / 1e6,
        )  # fmt: skip

    def load(
        self, engine: Any, loader: DistributedLoader, step: int | None, mode: universal.ResumeMode | None,
        groups: list[dict[str, Any]],
    ) -> int:  # fmt: skip
        """Load checkpoint `step` (chosen by `start_choice`) into every part; return the step to
        start at. `groups` are the optimizer's param-group settings (for the universal repair)."""
        if step is None:
            return 0
        local = self.store.local_copy(step)
        self.fetch(step_name(step), local, lambda _rel, into: self.store.verify(step, into=into))
        if mode == "universal":
            folder = self.universal_copy(step)
            t0 = time.perf_counter()
            loaded, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True)
            universal.repair_after_load(engine, groups)
            if self.reshard is not None:
                self.reshard["load_seconds"] = time.perf_counter() - t0
        else:
            loaded, _ = engine.load_checkpoint(str(local.parent), tag=local.name, load_module_strict=True)
        if loaded is None:
            raise CheckpointError(f"{step_name(step)}: DeepSpeed could not load it")
        state = json.loads((local / LOADER_FILE).read_text())
        loader.load_state_dict(state["loader"])
        rng = local / rng_file(self.world.rank)
        if rng.exists():  # absent when this rank did not exist at the checkpoint's world size
            import torch

            set_rng_state(torch.load(rng, weights_only=False))
        if self.world.rank == 0:
            log.info("resumed from %s/%s (step %d)", self.store.uri, step_name(step), step)
        return int(state["step"])

    # ------------------------------------------------------------------ saving

    def save(self, engine: Any, loader: DistributedLoader, step: int, *, background: bool = True) -> None:
        """Every rank writes its parts of checkpoint `step`; the store publishes it (in the
        background unless asked), manifest last."""
        self.store.wait()  # at most one upload in flight
        lost = self.world.broadcast(self.store.lease_problem() if self.world.rank == 0 else None)
        if lost:
            raise CheckpointError(f"{lost}: another run writes {self.store.uri}; stopping without saving step {step}")
        # The history goes up before this checkpoint can be committed: whatever attempt resumes
        # from it finds the curves up to it.
        self.history.sync()
        staging = self.store.staging_dir(step)
        try:
            self.write_parts(engine, loader, step, staging)
        except Exception:
            full = out_of_space(staging)
            if full is None:
                raise
            # The unfinished step has no manifest: nothing loads it, and the next run removes it.
            raise CheckpointError(
                f"cannot save checkpoint {step_name(step)}: {full}; free space (or lower checkpoint.keepLast) and run "
                "again: it resumes from the last complete checkpoint"
            ) from None
        self.world.barrier()
        meta = {"world_size": self.world.size, "zero_stage": self.job.spec.training.zero.stage,
                "job": self.job.metadata.name}  # fmt: skip
        self.store.commit(
            step, writes_manifest=self.world.rank == 0, uploads=self.world.uploads, meta=meta, background=background
        )

    def write_parts(self, engine: Any, loader: DistributedLoader, step: int, staging: Path) -> None:
        import torch

        engine.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)
        if self.world.rank == 0:
            (staging / LOADER_FILE).write_text(json.dumps({"step": step, "loader": loader.state_dict()}))
            (staging / JOB_FILE).write_text(self.job.model_dump_json(by_alias=True, exclude_none=True))
        torch.save(rng_state(), staging / rng_file(self.world.rank))

    # ------------------------------------------------------------------ reporting

    def report(self, metrics: TrainerMetrics) -> None:
        """Tell the metrics (and, once per new checkpoint, the history) what the store did."""
        s = self.store.stats
        metrics.observe_checkpoint(
            seconds=s.last_seconds, nbytes=s.last_bytes, failures=s.failures, step=s.last_verified_step,
            when=s.last_verified_time,
        )  # fmt: skip
        if s.last_verified_step is not None and s.last_verified_step != self._logged_step:
            self._logged_step = s.last_verified_step
            # durable with the next checkpoint's history upload (save) or at the end (close)
            self.history.log({"event": "checkpoint", "step": s.last_verified_step, "seconds": s.last_seconds,
                              "bytes": s.last_bytes})  # fmt: skip
        if s.failures and self.job.spec.checkpoint.fail_on_error:
            self.check_errors()

    def check_errors(self) -> None:
        s = self.store.stats
        if s.failures and self.job.spec.checkpoint.fail_on_error:
            raise CheckpointError(f"checkpoint failed and checkpoint.failOnError is set: {s.errors[-1]}")
        if s.failures and self.world.rank == 0:
            log.warning("%d checkpoint save(s) failed: %s", s.failures, s.errors[-1])
