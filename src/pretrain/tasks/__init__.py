"""Objectives, one module each: what a model learns to predict and how it is scored.

Each public module of this package is one task, named by its file (`extractive_qa.py` is
`extractive-qa`) and holding `TASK`, an instance of `Task`. Adding an objective is one new
module (plus its tests): the spec's `objective.type` accepts it, the CRD lists it (after
`make generate`), and training, `pretrain eval` and the export pick it up from here.

Names come from the file names without importing the modules (`pretrain.objectives`, a leaf),
so the API (and the operator image, which has no numpy or torch) can list them; a task's code
loads when it is used.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pretrain.objectives import names

if TYPE_CHECKING:
    from pretrain.api.spec import DataSpec, ObjectiveSpec
    from pretrain.data.labeled import LabeledSplit

Rows = list[tuple[str, dict[str, Any]]]


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


def label_names(objective: ObjectiveSpec, rows: Rows) -> list[str]:
    """The spec's names, else the task's names from the training rows; none for a task without
    labels."""
    from pretrain.data.sources import DataError

    task = get_fine_tuning(str(objective.type))
    if not task.has_labels:
        return []
    if objective.label_names:
        return list(objective.label_names)
    names = task.label_names(objective, rows)
    if not names:
        raise DataError("the training data has no labels")
    return names


def build_split(objective: ObjectiveSpec, data: DataSpec, tokenizer: Any, rows: Rows, names: list[str], *,
                training: bool) -> LabeledSplit:  # fmt: skip
    """The task's feature arrays of `rows`."""
    text_field = data.sources[0].text_field if data.sources else "text"
    return get_fine_tuning(str(objective.type)).build(
        objective, data.sequence_length, text_field, tokenizer, rows, names, training=training
    )


def load_labeled(objective: ObjectiveSpec, data: DataSpec, tokenizer: Any, seed: int,
                 names: list[str] | None = None) -> tuple[LabeledSplit, LabeledSplit, list[str]]:  # fmt: skip
    """(train, validation, label names) of a fine-tuning job: its rows read (data.labeled), held
    out as the spec says, and built into feature arrays by its task."""
    from pretrain.data.labeled import LabeledSplit, read_rows, split_rows
    from pretrain.data.sources import DataError

    rows = read_rows(data.sources)
    if not rows:
        raise DataError(f"{data.sources[0].uri}: no rows")
    if data.validation_sources:
        train_rows, val_rows = rows, read_rows(data.validation_sources)
    else:
        train_rows, val_rows = split_rows(rows, data.validation_split, seed)
    if not train_rows:
        raise DataError(f"{data.sources[0].uri}: no training rows left after the validation split")
    names = names or label_names(objective, train_rows)
    train = build_split(objective, data, tokenizer, train_rows, names, training=True)
    val = (
        build_split(objective, data, tokenizer, val_rows, names, training=False)
        if val_rows
        else LabeledSplit({}, [], [])
    )
    return train, val, names
