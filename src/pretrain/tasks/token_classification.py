"""token-classification: a tag per word (BIO named entities...); entity precision, recall, F1.

Words are tokenized as split words; each word's first token carries its tag, the others are
ignored by the loss, and a prediction is read back at each word's first token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.data.collator import IGNORE_INDEX
from pretrain.data.labeled import LabeledSplit, get_field, label_id
from pretrain.data.sources import DataError
from pretrain.evaluation import entity_scores
from pretrain.tasks import FineTuningTask, Rows

if TYPE_CHECKING:
    from pretrain.api.spec import ObjectiveSpec


class TokenClassification(FineTuningTask):
    name = "token-classification"
    model_class = "AutoModelForTokenClassification"

    def label_names(self, objective: ObjectiveSpec, rows: Rows) -> list[str]:
        return sorted({str(t) for where, row in rows for t in get_field(row, objective.tags_field, where)})

    def build(
        self, objective: ObjectiveSpec, length: int, text_field: str, tokenizer: Any, rows: Rows, names: list[str],
        *, training: bool,
    ) -> LabeledSplit:  # fmt: skip
        words, tags = [], []
        for w, r in rows:
            ws = [str(x) for x in get_field(r, objective.tokens_field, w)]
            ts = [label_id(t, names, w, "tag") for t in get_field(r, objective.tags_field, w)]
            if len(ws) != len(ts):
                raise DataError(f"{w}: {len(ws)} tokens but {len(ts)} tags")
            words.append(ws)
            tags.append(ts)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=length, padding="max_length",
                        add_special_tokens=False)  # fmt: skip
        tag_ids = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
        word_ids = []
        for i in range(len(rows)):
            ids = enc.word_ids(i)
            word_ids.append(ids)
            previous = None
            for t, wid in enumerate(ids):
                if wid is not None and wid != previous:
                    tag_ids[i, t] = tags[i][wid]
                previous = wid
        features = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
            "labels": tag_ids,
        }
        return LabeledSplit(features, gold=[[names[t] for t in ts] for ts in tags], meta=list(word_ids))

    def predict(
        self, out: Any, split: LabeledSplit, index: Any, objective: ObjectiveSpec, names: list[str]
    ) -> list[Any]:
        token_preds = out.logits.float().argmax(-1).cpu().numpy()
        predictions = []
        for row, i in zip(token_preds, index, strict=True):
            word_ids = split.meta[i]
            n_words = len(split.gold[i])
            tags = ["O"] * n_words
            previous = None
            for t, wid in enumerate(word_ids):
                if wid is not None and wid != previous and wid < n_words:
                    tags[wid] = names[int(row[t])]
                previous = wid
            predictions.append(tags)
        return predictions

    def score(
        self, objective: ObjectiveSpec, gold: list[Any], predictions: list[Any], names: list[str]
    ) -> dict[str, float]:
        return entity_scores(gold, predictions)


TASK = TokenClassification()
