"""Task metrics, pure and dependency-free: accuracy and macro F1 (classification), entity-level
precision/recall/F1 over BIO tags (token classification, as seqeval's default mode), exact match
and token F1 (extractive QA, as the SQuAD v1.1 script)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def macro_f1(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> float:
    """Mean over classes that occur in gold or predictions of each class's F1."""
    scores = []
    for c in range(num_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO (or IOB2) tag sequence; an I- without a B- starts one."""
    out: set[tuple[str, int, int]] = set()
    kind: str | None = None
    start = 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            out.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return out


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over sentences (exact span and type)."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred, strict=True):
        ge, pe = entities(g), entities(p)
        tp += len(ge & pe)
        n_pred += len(pe)
        n_gold += len(ge)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, articles and extra whitespace (the SQuAD rule)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    best = 0.0
    pred_tokens = normalize_answer(prediction).split()
    for a in answers:
        gold_tokens = normalize_answer(a).split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        same = sum(common.values())
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        if same == 0:
            continue
        p, r = same / len(pred_tokens), same / len(gold_tokens)
        best = max(best, 2 * p * r / (p + r))
    return best


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0}
    return {
        "exact_match": sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / n,
        "f1": sum(token_f1(p, a) for p, a in zip(predictions, answers, strict=True)) / n,
    }
