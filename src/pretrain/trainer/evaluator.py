"""Evaluation, one implementation for training, `pretrain eval` and export checks.

Language modelling: the mean loss (and perplexity) over packed validation rows, masked with a
fixed seed stream for MLM so every evaluation of a model sees the same masks. Fine-tuning tasks:
their own metrics over the whole validation split, predicted on every rank's share, gathered
and scored by the task (`pretrain.tasks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pretrain.api.spec import ObjectiveSpec
from pretrain.data.collator import Collator
from pretrain.data.labeled import LabeledSplit
from pretrain.tasks import get_fine_tuning
from pretrain.trainer.world import World

#: Masking seed "step" of evaluation batches: fixed, and apart from every training step.
EVAL_MASK_STREAM = 2**32 - 1

Batch = dict[str, np.ndarray[Any, Any]]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def lm_loss_sum(
    model: Any, batches: Iterable[np.ndarray[Any, Any]], collate: Collator, to_device: Callable[[Batch], Any], *,
    rank: int = 0,
) -> tuple[float, int]:  # fmt: skip
    """(sum of per-row mean losses, rows) over `batches` of packed rows; no gradients."""
    import torch

    total, rows = 0.0, 0
    with torch.no_grad():
        for i, batch_rows in enumerate(batches):
            batch = to_device(collate(batch_rows, step=EVAL_MASK_STREAM, rank=rank, micro=i))
            total += float(model(**batch).loss) * len(batch_rows)
            rows += len(batch_rows)
    return total, rows


def evaluate_task(
    model: Any, split: LabeledSplit, objective: ObjectiveSpec, names: list[str], *, rank: int, world: int,
    micro_batch: int, to_device: Callable[[dict[str, np.ndarray[Any, Any]]], dict[str, Any]],
) -> dict[str, float]:  # fmt: skip
    """Metrics (and the mean loss) over the whole validation split; collective over all ranks."""
    import torch
    import torch.distributed as dist

    task = get_fine_tuning(str(objective.type))
    mine = np.arange(rank, len(split), world)
    results: list[tuple[int, Any]] = []
    loss_sum = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for k in range(0, len(mine), micro_batch):
            index = mine[k : k + micro_batch]
            out = model(**to_device(split.rows(index)))
            loss_sum[0] += float(out.loss) * len(index)
            loss_sum[1] += len(index)
            results.extend(zip(index.tolist(), task.predict(out, split, index, objective, names), strict=True))
    gathered: list[list[tuple[int, Any]]] = [[] for _ in range(world)] if world > 1 else [results]
    if world > 1:
        dist.all_gather_object(gathered, results)
        dist.all_reduce(loss_sum)
    merged = dict(item for part in gathered for item in part)
    order = sorted(merged)
    scores = task.score(objective, [split.gold[i] for i in order], [merged[i] for i in order], names)
    scores["loss"] = float(loss_sum[0]) / max(float(loss_sum[1]), 1.0)
    scores["examples"] = float(len(order))
    return scores


class Evaluator:
    """Evaluate a model during or after training; collective over all ranks."""

    def __init__(
        self, objective: ObjectiveSpec, world: World, *, collate: Collator, lm_batches: list[np.ndarray[Any, Any]],
        task_split: Any = None, label_names: list[str] | None = None, micro_batch: int = 1,
    ) -> None:  # fmt: skip
        self.objective, self.world, self.collate = objective, world, collate
        self.lm_batches, self.task_split = lm_batches, task_split
        self.label_names, self.micro_batch = label_names or [], micro_batch

    def __call__(self, model: Any) -> dict[str, float]:
        """Scores (with "loss") of `model` now; empty when there is nothing to evaluate on."""
        model.eval()
        try:
            return self.task_scores(model) if self.objective.fine_tuning else self.lm_scores(model)
        finally:
            model.train()

    def lm_scores(self, model: Any) -> dict[str, float]:
        import torch

        if not self.lm_batches:
            return {}
        total, rows = lm_loss_sum(model, self.lm_batches, self.collate, self.world.to_device, rank=self.world.rank)
        summed = self.world.all_reduce(torch.tensor([total, rows], dtype=torch.float64))
        loss = float(summed[0] / summed[1])
        return {"loss": loss, "perplexity": perplexity(loss)}

    def task_scores(self, model: Any) -> dict[str, float]:
        if self.task_split is None or len(self.task_split) == 0:
            return {}
        return evaluate_task(
            model, self.task_split, self.objective, self.label_names, rank=self.world.rank, world=self.world.size,
            micro_batch=self.micro_batch, to_device=self.world.to_device,
        )  # fmt: skip
