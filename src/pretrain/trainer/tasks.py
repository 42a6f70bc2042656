"""Evaluation of fine-tuning tasks: predictions on every validation example (split across
ranks), gathered on rank 0, scored with pretrain.evaluation, shared back to every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pretrain.api.spec import ObjectiveSpec
from pretrain.data.labeled import LabeledSplit
from pretrain.evaluation import accuracy, entity_scores, macro_f1, qa_scores


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


def predict(model_out: Any, split: LabeledSplit, index: np.ndarray[Any, Any], objective: ObjectiveSpec,
            names: list[str]) -> list[Any]:  # fmt: skip
    """Predictions for the examples at `index` from one forward pass's output."""
    if objective.type == "sequence-classification":
        return [int(x) for x in model_out.logits.float().argmax(-1).cpu().numpy()]
    if objective.type == "token-classification":
        token_preds = model_out.logits.float().argmax(-1).cpu().numpy()
        out = []
        for row, i in zip(token_preds, index, strict=True):
            word_ids = split.meta[i]
            n_words = len(split.gold[i])
            tags = ["O"] * n_words
            previous = None
            for t, wid in enumerate(word_ids):
                if wid is not None and wid != previous and wid < n_words:
                    tags[wid] = names[int(row[t])]
                previous = wid
            out.append(tags)
        return out
    starts = model_out.start_logits.float().cpu().numpy()
    ends = model_out.end_logits.float().cpu().numpy()
    texts = []
    for s_logits, e_logits, i in zip(starts, ends, index, strict=True):
        meta = split.meta[i]
        allowed = np.array([sid == 1 for sid in meta["sequence_ids"]])
        s, e = best_span(s_logits, e_logits, allowed, objective.max_answer_tokens)
        offsets = meta["offsets"]
        texts.append(meta["context"][offsets[s][0] : offsets[e][1]] if allowed.any() else "")
    return texts


def score(objective: ObjectiveSpec, gold: list[Any], predictions: list[Any], names: list[str]) -> dict[str, float]:
    if objective.type == "sequence-classification":
        return {"accuracy": accuracy(gold, predictions), "macro_f1": macro_f1(gold, predictions, len(names))}
    if objective.type == "token-classification":
        return entity_scores(gold, predictions)
    return qa_scores(predictions, gold)


def evaluate(
    model: Any, split: LabeledSplit, objective: ObjectiveSpec, names: list[str], *, rank: int, world: int,
    micro_batch: int, to_device: Callable[[dict[str, np.ndarray[Any, Any]]], dict[str, Any]],
) -> dict[str, float]:  # fmt: skip
    """Metrics (and the mean loss) over the whole validation split; collective over all ranks."""
    import torch
    import torch.distributed as dist

    mine = np.arange(rank, len(split), world)
    results: list[tuple[int, Any]] = []
    loss_sum = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for k in range(0, len(mine), micro_batch):
            index = mine[k : k + micro_batch]
            out = model(**to_device(split.rows(index)))
            loss_sum[0] += float(out.loss) * len(index)
            loss_sum[1] += len(index)
            results.extend(zip(index.tolist(), predict(out, split, index, objective, names), strict=True))
    gathered: list[list[tuple[int, Any]]] = [[] for _ in range(world)] if world > 1 else [results]
    if world > 1:
        dist.all_gather_object(gathered, results)
        dist.all_reduce(loss_sum)
    merged = dict(item for part in gathered for item in part)
    order = sorted(merged)
    scores = score(objective, [split.gold[i] for i in order], [merged[i] for i in order], names)
    scores["loss"] = float(loss_sum[0]) / max(float(loss_sum[1]), 1.0)
    scores["examples"] = float(len(order))
    return scores
