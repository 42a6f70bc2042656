"""Objectives, one module each: what a model learns to predict and how it is scored.

Each public module of this package is one task, named by its file (`extractive_qa.py` is
`extractive-qa`) and holding `TASK`, an instance of `Task`. Adding an objective is one new
module (plus its tests): the spec's `objective.type` accepts it, the CRD lists it (after
`make generate`), and training, `pretrain eval` and the export pick it up from here.

Names come from the file names without importing the modules, so the API (and the operator
image, which has no numpy or torch) can list them; a task's code loads when it is used.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.api.spec import ObjectiveSpec
    from pretrain.data.labeled import LabeledSplit

Rows = list[tuple[str, dict[str, Any]]]

#: The objectives that train on packed text; every other task fine-tunes on labelled rows. Named
#: here so that the API (and the operator, which has no numpy) knows without importing a task
#: module; tests/test_tasks.py checks it against each module's `Task.fine_tuning`.
LANGUAGE_MODELLING = ("clm", "mlm")


class Task:
    """An objective: what the model's head is and how it is trained. Language-modelling tasks
    train on packed text, and the collator builds their labels; see `FineTuningTask` for the
    tasks that train on labelled rows."""

    name: str = ""
    #: The transformers Auto class that adds this task's head.
    model_class: str = ""
    #: Trained on labelled rows (a `FineTuningTask`) rather than packed text.
    fine_tuning: bool = False
    #: The transformers loss, for language modelling (none: the head's own).
    loss_type: str | None = None
    #: Whether the task classifies into named labels (kept in the model's config).
    has_labels: bool = False


class FineTuningTask(Task, ABC):
    """A task trained and scored on labelled rows."""

    fine_tuning = True
    has_labels = True

    def label_names(self, objective: ObjectiveSpec, rows: Rows) -> list[str]:
        """The label names of the training rows, when the spec names none (tasks with labels)."""
        return []

    @abstractmethod
    def build(
        self, objective: ObjectiveSpec, length: int, text_field: str, tokenizer: Any, rows: Rows, names: list[str],
        *, training: bool,
    ) -> LabeledSplit:  # fmt: skip
        """Feature arrays (the model's keyword arguments) of `rows`, with what scoring needs."""

    @abstractmethod
    def predict(
        self, out: Any, split: LabeledSplit, index: Any, objective: ObjectiveSpec, names: list[str]
    ) -> list[Any]:
        """Predictions for the examples at `index` from one forward pass's output."""

    @abstractmethod
    def score(
        self, objective: ObjectiveSpec, gold: list[Any], predictions: list[Any], names: list[str]
    ) -> dict[str, float]:
        """Metrics of `predictions` against `gold`, over the whole validation split."""


@cache
def names() -> tuple[str, ...]:
    """Every task's name, from this package's module files (none is imported)."""
    return tuple(sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(name: str) -> Task:
    if name not in names():
        raise ValueError(f"unknown objective {name!r}: one of {', '.join(names())}")
    task: Task = importlib.import_module(f"{__name__}.{name.replace('-', '_')}").TASK
    return task


def get_fine_tuning(name: str) -> FineTuningTask:
    task = get(name)
    if not isinstance(task, FineTuningTask):
        raise ValueError(f"objective {name!r} is not a fine-tuning task")
    return task
