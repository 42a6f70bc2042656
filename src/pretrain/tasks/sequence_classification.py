"""sequence-classification: one label per text (sentiment, topic...); accuracy and macro F1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.data.labeled import LabeledSplit, get_field, label_id
from pretrain.evaluation import accuracy, macro_f1
from pretrain.tasks import FineTuningTask, Rows

if TYPE_CHECKING:
    from pretrain.api.spec import ObjectiveSpec


class SequenceClassification(FineTuningTask):
    name = "sequence-classification"
    model_class = "AutoModelForSequenceClassification"

    def label_names(self, objective: ObjectiveSpec, rows: Rows) -> list[str]:
        return sorted({str(get_field(row, objective.label_field, where)) for where, row in rows})

    def build(
        self, objective: ObjectiveSpec, length: int, text_field: str, tokenizer: Any, rows: Rows, names: list[str],
        *, training: bool,
    ) -> LabeledSplit:  # fmt: skip
        texts = [str(get_field(r, text_field, w)) for w, r in rows]
        labels = [label_id(get_field(r, objective.label_field, w), names, w, "label") for w, r in rows]
        enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", add_special_tokens=False)
        features = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(rows), length),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64).reshape(len(rows), length),
            "labels": np.asarray(labels, dtype=np.int64),
        }
        return LabeledSplit(features, gold=labels, meta=[None] * len(rows))

    def predict(
        self, out: Any, split: LabeledSplit, index: Any, objective: ObjectiveSpec, names: list[str]
    ) -> list[Any]:
        return [int(x) for x in out.logits.float().argmax(-1).cpu().numpy()]

    def score(
        self, objective: ObjectiveSpec, gold: list[Any], predictions: list[Any], names: list[str]
    ) -> dict[str, float]:
        return {"accuracy": accuracy(gold, predictions), "macro_f1": macro_f1(gold, predictions, len(names))}


TASK = SequenceClassification()
