"""extractive-qa: the answer's span in a context (SQuAD); exact match and token F1.

The question and context are tokenized as a pair, the context truncated to fit; the answer's
first and last token are the targets. Training keeps the questions answerable in the window;
evaluation scores every question."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.data.labeled import LabeledSplit, get_field
from pretrain.data.sources import DataError
from pretrain.evaluation import qa_scores
from pretrain.tasks import FineTuningTask, Rows

if TYPE_CHECKING:
    from pretrain.api.spec import ObjectiveSpec


def best_span(
    start: np.ndarray[Any, Any], end: np.ndarray[Any, Any], allowed: np.ndarray[Any, Any], max_len: int
) -> tuple[int, int]:
    """The (start, end) token pair of highest start+end score with start <= end < start+max_len,
    both inside the context."""
    best, pair = -np.inf, (0, 0)
    idx = np.flatnonzero(allowed)
    for s in idx:
        window = idx[(idx >= s) & (idx < s + max_len)]
        if len(window) == 0:
            continue
        e = window[np.argmax(end[window])]
        score = start[s] + end[e]
        if score > best:
            best, pair = score, (int(s), int(e))
    return pair


def _checked_answers(objective: ObjectiveSpec, where: str, row: dict[str, Any], context: str) -> dict[str, Any]:
    a = get_field(row, objective.answers_field, where)
    if not isinstance(a, dict) or not a.get("text") or len(a.get("text", [])) != len(a.get("answer_start", [])):
        raise DataError(
            f"{where}: {objective.answers_field} must be {{text: [...], answer_start: [...]}} with one start per text"
        )
    for text, start in zip(a["text"], a["answer_start"], strict=True):
        if not int(start) >= 0 or int(start) + len(text) > len(context):
            raise DataError(f"{where}: answer {text!r} at {start} lies outside its context ({len(context)} characters)")
        if context[int(start) : int(start) + len(text)] != text:
            raise DataError(f"{where}: answer {text!r} is not at {start} of its context")
    return a


def _answer_tokens(sequence_ids: list[Any], offsets: list[Any], answer: dict[str, Any]) -> tuple[int, int] | None:
    """The first and last context token of the first answer, or None when the window cut it."""
    char_start = int(answer["answer_start"][0])
    char_end = char_start + len(answer["text"][0])
    s = e = None
    for t, (sid, (o0, o1)) in enumerate(zip(sequence_ids, offsets, strict=True)):
        if sid != 1:
            continue
        if s is None and o0 <= char_start < max(o1, o0 + 1):
            s = t
        if o0 < char_end <= o1:
            e = t
    return (s, e) if s is not None and e is not None and e >= s else None


class ExtractiveQA(FineTuningTask):
    name = "extractive-qa"
    model_class = "AutoModelForQuestionAnswering"
    has_labels = False

    def build(
        self, objective: ObjectiveSpec, length: int, text_field: str, tokenizer: Any, rows: Rows, names: list[str],
        *, training: bool,
    ) -> LabeledSplit:  # fmt: skip
        questions = [str(get_field(r, objective.question_field, w)) for w, r in rows]
        contexts = [str(get_field(r, objective.context_field, w)) for w, r in rows]
        answers = [_checked_answers(objective, w, r, c) for (w, r), c in zip(rows, contexts, strict=True)]
        enc = tokenizer(questions, contexts, truncation="only_second", max_length=length, padding="max_length",
                        return_offsets_mapping=True, add_special_tokens=False)  # fmt: skip
        starts = np.zeros(len(rows), dtype=np.int64)
        ends = np.zeros(len(rows), dtype=np.int64)
        keep, meta = [], []
        for i, a in enumerate(answers):
            seq, offsets = enc.sequence_ids(i), enc["offset_mapping"][i]
            meta.append({"sequence_ids": seq, "offsets": offsets, "context": contexts[i]})
            span = _answer_tokens(seq, offsets, a)
            if span is not None:
                starts[i], ends[i] = span
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

    def predict(
        self, out: Any, split: LabeledSplit, index: Any, objective: ObjectiveSpec, names: list[str]
    ) -> list[Any]:
        starts = out.start_logits.float().cpu().numpy()
        ends = out.end_logits.float().cpu().numpy()
        texts = []
        for s_logits, e_logits, i in zip(starts, ends, index, strict=True):
            meta = split.meta[i]
            allowed = np.array([sid == 1 for sid in meta["sequence_ids"]])
            s, e = best_span(s_logits, e_logits, allowed, objective.max_answer_tokens)
            offsets = meta["offsets"]
            texts.append(meta["context"][offsets[s][0] : offsets[e][1]] if allowed.any() else "")
        return texts

    def score(
        self, objective: ObjectiveSpec, gold: list[Any], predictions: list[Any], names: list[str]
    ) -> dict[str, float]:
        return qa_scores(predictions, gold)


TASK = ExtractiveQA()
