"""Labelled data for fine-tuning: rows from any source the data layer reads, tokenized into
fixed-length feature arrays (fine-tuning sets fit in memory), with what evaluation needs.

A `LabeledSplit` has the same face as a `PackedSplit` (`len`, `rows(index)`, `source_ranges`),
so the distributed loader and its exact resume serve fine-tuning unchanged; `rows` returns the
model's keyword arguments as arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec, DataSpec, ObjectiveSpec
from pretrain.data.collator import IGNORE_INDEX
from pretrain.data.sources import DataError, iter_rows, resolve_files


@dataclass
class LabeledSplit:
    features: dict[str, np.ndarray[Any, Any]]
    #: Per example, what evaluation compares against (label id, word tags, answers...).
    gold: list[Any] = field(default_factory=list)
    #: Per example, what turns a prediction back into words (word ids, offsets, context).
    meta: list[Any] = field(default_factory=list)
    directory: Path = Path("<labelled data>")

    def __len__(self) -> int:
        return len(self.gold)

    def rows(self, index: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        return {k: v[index] for k, v in self.features.items()}

    def source_ranges(self) -> dict[int, np.ndarray[Any, Any]]:
        return {0: np.arange(len(self))}


def read_rows(sources: list[DataSourceSpec]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for src in sources:
        for f in resolve_files(src):
            out.extend(iter_rows(src, f))
    return out


def _split(rows: list[tuple[str, dict[str, Any]]], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic held-out share, chosen by a hash of (seed, position)."""
    if share <= 0:
        return rows, []
    held = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32 < share for i in range(len(rows))]
    return [r for r, h in zip(rows, held, strict=True) if not h], [r for r, h in zip(rows, held, strict=True) if h]


def _get(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: no field {name!r} (fields: {', '.join(sorted(row))})")
    return row[name]


def label_names(objective: ObjectiveSpec, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The spec's names, else the sorted distinct labels (or tags) of the training rows."""
    if objective.label_names:
        return list(objective.label_names)
    seen: set[str] = set()
    for where, row in rows:
        if objective.type == "sequence-classification":
            seen.add(str(_get(row, objective.label_field, where)))
        else:
            seen.update(str(t) for t in _get(row, objective.tags_field, where))
    if not seen:
        raise DataError("the training data has no labels")
    return sorted(seen)


def _label_id(value: Any, names: list[str], where: str, what: str) -> int:
    key = str(value)
    if key not in names:
        raise DataError(f"{where}: {what} {key!r} is not one of {', '.join(names[:20])}")
    return names.index(key)


def build(objective: ObjectiveSpec, data: DataSpec, tokenizer: Any, rows: list[tuple[str, dict[str, Any]]],
          names: list[str], *, training: bool) -> LabeledSplit:  # fmt: skip
    length = data.sequence_length
    text_field = data.sources[0].text_field if data.sources else "text"
    if objective.type == "sequence-classification":
        texts = [str(_get(r, text_field, w)) for w, r in rows]
        labels = [_label_id(_get(r, objective.label_field, w), names, w, "label") for w, r in rows]
        enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", add_special_tokens=False)
        features = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(rows), length),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64).reshape(len(rows), length),
            "labels": np.asarray(labels, dtype=np.int64),
        }
        return LabeledSplit(features, gold=labels, meta=[None] * len(rows))
    if objective.type == "token-classification":
        words, tags = [], []
        for w, r in rows:
            ws = [str(x) for x in _get(r, objective.tokens_field, w)]
            ts = [_label_id(t, names, w, "tag") for t in _get(r, objective.tags_field, w)]
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
    # extractive-qa
    questions, contexts, answers = [], [], []
    for w, r in rows:
        q, c = str(_get(r, objective.question_field, w)), str(_get(r, objective.context_field, w))
        a = _get(r, objective.answers_field, w)
        if not isinstance(a, dict) or not a.get("text") or len(a.get("text", [])) != len(a.get("answer_start", [])):
            raise DataError(
                f"{w}: {objective.answers_field} must be {{text: [...], answer_start: [...]}} with one start per text"
            )
        for text, start in zip(a["text"], a["answer_start"], strict=True):
            if not int(start) >= 0 or int(start) + len(text) > len(c):
                raise DataError(f"{w}: answer {text!r} at {start} lies outside its context ({len(c)} characters)")
            if c[int(start) : int(start) + len(text)] != text:
                raise DataError(f"{w}: answer {text!r} is not at {start} of its context")
        questions.append(q)
        contexts.append(c)
        answers.append(a)
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=length, padding="max_length",
                    return_offsets_mapping=True, add_special_tokens=False)  # fmt: skip
    starts = np.zeros(len(rows), dtype=np.int64)
    ends = np.zeros(len(rows), dtype=np.int64)
    keep = []
    meta = []
    for i, a in enumerate(answers):
        seq = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        char_start = int(a["answer_start"][0])
        char_end = char_start + len(a["text"][0])
        s = e = None
        for t, (sid, (o0, o1)) in enumerate(zip(seq, offsets, strict=True)):
            if sid != 1:
                continue
            if s is None and o0 <= char_start < max(o1, o0 + 1):
                s = t
            if o0 < char_end <= o1:
                e = t
        meta.append({"sequence_ids": seq, "offsets": offsets, "context": contexts[i]})
        if s is not None and e is not None and e >= s:
            starts[i], ends[i] = s, e
            keep.append(i)
        elif not training:
            keep.append(i)  # evaluation scores every question, answerable in the window or not
    idx = np.asarray(keep, dtype=np.int64)
    features = {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64)[idx],
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64)[idx],
        "start_positions": starts[idx],
        "end_positions": ends[idx],
    }
    return LabeledSplit(features, gold=[list(answers[i]["text"]) for i in keep], meta=[meta[i] for i in keep])


def load(objective: ObjectiveSpec, data: DataSpec, tokenizer: Any, seed: int,
         names: list[str] | None = None) -> tuple[LabeledSplit, LabeledSplit, list[str]]:  # fmt: skip
    """(train, validation, label names) for a fine-tuning job."""
    rows = read_rows(data.sources)
    if not rows:
        raise DataError(f"{data.sources[0].uri}: no rows")
    if data.validation_sources:
        train_rows, val_rows = rows, read_rows(data.validation_sources)
    else:
        train_rows, val_rows = _split(rows, data.validation_split, seed)
    if not train_rows:
        raise DataError(f"{data.sources[0].uri}: no training rows left after the validation split")
    names = names or ([] if objective.type == "extractive-qa" else label_names(objective, train_rows))
    train = build(objective, data, tokenizer, train_rows, names, training=True)
    val = build(objective, data, tokenizer, val_rows, names, training=False) if val_rows else LabeledSplit({}, [], [])
    return train, val, names
