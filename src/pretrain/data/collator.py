"""Batches for the model: causal-LM labels, or BERT-style masking (80% mask, 10% random, 10% kept).

Masking is drawn from a generator seeded by (seed, step, rank, micro step), so a resumed run
masks exactly as the uninterrupted run would, with no RNG state to checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Collator:
    objective: str  # "clm" or "mlm"
    vocab_size: int
    mask_token_id: int | None = None
    special_ids: tuple[int, ...] = ()
    mask_probability: float = 0.15
    seed: int = 0

    def __call__(
        self, rows: np.ndarray[Any, Any], *, step: int = 0, rank: int = 0, micro: int = 0
    ) -> dict[str, np.ndarray[Any, Any]]:
        if isinstance(rows, dict):  # fine-tuning: the features are the model's inputs already
            return rows
        if self.objective == "clm":
            # transformers' causal-LM heads shift labels by one themselves.
            return {"input_ids": rows, "labels": rows.copy()}
        return self.mask(rows, np.random.default_rng([self.seed, step, rank, micro]))

    def mask(self, rows: np.ndarray[Any, Any], rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
        assert self.mask_token_id is not None, "mlm needs a tokenizer with a mask token"
        inputs = rows.copy()
        labels = np.full_like(rows, IGNORE_INDEX)
        candidates = ~np.isin(rows, np.asarray(self.special_ids, dtype=rows.dtype))
        selected = (rng.random(rows.shape) < self.mask_probability) & candidates
        labels[selected] = rows[selected]
        roll = rng.random(rows.shape)
        to_mask = selected & (roll < 0.8)
        to_random = selected & (roll >= 0.8) & (roll < 0.9)
        inputs[to_mask] = self.mask_token_id
        inputs[to_random] = rng.integers(0, self.vocab_size, size=int(to_random.sum()))
        return {"input_ids": inputs, "labels": labels}
