"""One optimizer step, and the reading back of its results without stalling the device.

`train_step` runs the micro-batches of one step through the engine and returns the step's mean
loss as a tensor on the device: nothing waits for the device to finish. `StepSync` holds those
tensors and reads them back, averaged over every rank in one all-reduce, only at sync points (a
log step, a checkpoint, an evaluation, the end, or once a second for the progress line and
train_log.jsonl). The stop flag (a SIGTERM on any rank) and rank 0's wish to read back travel
in a CPU all-reduce of their own that runs while the next step computes and is read one step
later, so every rank stops (and reads back) after the same step without a per-step host sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.data.collator import Collator
from pretrain.trainer.world import World, distributed

#: Read losses back at least this often (seconds) when no log step comes sooner.
SYNC_SECONDS = 1.0


@dataclass(frozen=True)
class StepCall:
    """What one step runs with, beside the engine and its batches."""

    step: int
    rank: int
    to_device: Callable[[dict[str, np.ndarray[Any, Any]]], dict[str, Any]]
    #: Tests only (guard.FAULT_ENV): multiplies the loss before its backward, a NaN or a spike.
    fault: float | None = None
    #: Given the step's local mean loss (a device tensor) just before the optimizer steps: the
    #: skip-step judge (skipstep.py) of `training.guard.action: skip`.
    before_update: Callable[[Any], None] | None = None


def train_step(engine: Any, batches: Sequence[np.ndarray[Any, Any]], collate: Collator, call: StepCall) -> Any:
    """Forward and backward over one step's micro-batches (the engine steps the optimizer at
    the accumulation boundary, after the last); the local mean loss, as a device tensor."""
    total: Any = None
    for micro, rows in enumerate(batches):
        out = engine(**call.to_device(collate(rows, step=call.step, rank=call.rank, micro=micro)))
        if call.fault is not None:
            out.loss = out.loss * call.fault
        engine.backward(out.loss)
        loss = out.loss.detach().double()  # summed as the host would: float64
        total = loss if total is None else total + loss
        if call.before_update is not None and micro == len(batches) - 1:
            call.before_update(total / len(batches))
        engine.step()
    return total / len(batches)


@dataclass
class StepResult:
    """A finished step as the host knows it; `loss` and `grad_norm` may still be on the device."""

    step: int
    loss: Any
    lr: float
    grad_norm: Any
    seconds: float
    epoch: int
    #: Rows trained on by source since the run began, as of this step (the loader's count).
    source_rows: dict[int, int] | None = None
    #: 1.0 on the device when the step's update was left out (guard action skip), else None.
    skipped: Any = None


def _skipped_flags(pending: list[StepResult]) -> dict[int, bool]:
    """Step -> whether its update was left out, for the steps the skip-step judge saw."""
    import torch

    gated = [r for r in pending if r.skipped is not None]
    if not gated:
        return {}
    flags = torch.stack([r.skipped for r in gated]).tolist()  # read with the losses: no sync of its own
    return {r.step: bool(f) for r, f in zip(gated, flags, strict=True)}


class StepSync:
    def __init__(self, world: World) -> None:
        self.world = world
        self.pending: list[StepResult] = []
        self.last_sync = time.monotonic()
        self._flag: Any = None  # (tensor, work) of the stop flag in flight
        self._group: Any = None
        self._sync_asked = False  # rank 0's sync request is in the exchange in flight
        if distributed():
            import torch.distributed as dist

            # A gloo group of its own: the flag is a CPU tensor whatever the device, and its
            # all-reduce never queues behind (or ahead of) the engine's collectives.
            self._group = dist.new_group(backend="gloo")

    def add(self, result: StepResult) -> None:
        self.pending.append(result)

    def flush(self) -> list[dict[str, Any]]:
        """The pending steps with their losses averaged over every rank: one all-reduce and
        one host read for all of them."""
        import torch

        if not self.pending:
            return []
        losses = torch.stack([r.loss for r in self.pending]).to(torch.float64)
        values = (self.world.all_reduce(losses) / self.world.size).tolist()
        skipped = _skipped_flags(self.pending)
        rows = [
            {"step": r.step, "loss": loss, "lr": r.lr, "grad_norm": None if r.grad_norm is None else float(r.grad_norm),
             "seconds": r.seconds, "epoch": r.epoch, "source_rows": r.source_rows,
             **({"skipped": bool(skipped[r.step])} if r.step in skipped else {})}
            for r, loss in zip(self.pending, values, strict=True)
        ]  # fmt: skip
        self.pending = []
        self.last_sync = time.monotonic()
        return rows

    def exchange(self, stop_requested: bool) -> tuple[bool, bool]:
        """(stop, sync) agreed by every rank for after this step. Stop: some rank had asked to
        stop by the end of the previous step. Sync: rank 0 wants the losses read back (a second
        has passed). Starts this step's exchange and reads the previous one's."""
        wants_sync = self.world.rank == 0 and not self._sync_asked and time.monotonic() - self.last_sync >= SYNC_SECONDS
        if self._group is None:
            return stop_requested, wants_sync
        import torch
        import torch.distributed as dist

        previous = self._flag
        flag = torch.tensor([int(stop_requested), int(wants_sync)], dtype=torch.int32)
        self._flag = (flag, dist.all_reduce(flag, group=self._group, async_op=True))
        self._sync_asked = wants_sync
        if previous is None:
            return False, False
        previous[1].wait()
        stop, sync = previous[0].tolist()
        return stop > 0, sync > 0

    def close(self) -> None:
        """Wait for the exchange in flight (every rank started it), then drop the group."""
        if self._flag is not None:
            self._flag[1].wait()
            self._flag = None
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None
