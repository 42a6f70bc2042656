"""Labelled data for fine-tuning: rows from any source the data layer reads, tokenized into
fixed-length feature arrays (fine-tuning sets fit in memory), with what evaluation needs.

A `LabeledSplit` has the same face as a `PackedSplit` (`len`, `rows(index)`, `blocks`),
so the distributed loader and its exact resume serve fine-tuning unchanged; `rows` returns the
model's keyword arguments as arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec
from pretrain.data.order import Blocks, uniform_blocks
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

    def blocks(self) -> Blocks:
        return uniform_blocks(len(self), 1)

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.zeros(len(index), dtype=np.int64)


def read_rows(sources: list[DataSourceSpec]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for src in sources:
        for f in resolve_files(src):
            out.extend(iter_rows(src, f))
    return out


def split_rows(rows: list[tuple[str, dict[str, Any]]], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic held-out share, chosen by a hash of (seed, position)."""
    if share <= 0:
        return rows, []
    held = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32 < share for i in range(len(rows))]
    return [r for r, h in zip(rows, held, strict=True) if not h], [r for r, h in zip(rows, held, strict=True) if h]


def get_field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: no field {name!r} (fields: {', '.join(sorted(row))})")
    return row[name]


def label_id(value: Any, names: list[str], where: str, what: str) -> int:
    key = str(value)
    if key not in names:
        raise DataError(f"{where}: {what} {key!r} is not one of {', '.join(names[:20])}")
    return names.index(key)
