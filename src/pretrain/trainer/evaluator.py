"""Evaluation, one implementation for training, `pretrain eval` and export checks.

Language modelling: the mean loss (and perplexity) over packed validation rows, masked with a
fixed seed stream for MLM so every evaluation of a model sees the same masks. Fine-tuning tasks:
their own metrics over the whole validation split (`pretrain.trainer.tasks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pretrain.api.spec import ObjectiveSpec
from pretrain.data.collator import Collator
from pretrain.trainer import tasks
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
        return tasks.evaluate(
            model, self.task_split, self.objective, self.label_names, rank=self.world.rank, world=self.world.size,
            micro_batch=self.micro_batch, to_device=self.world.to_device,
        )  # fmt: skip
