"""Test doubles of the data layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.order import Blocks, uniform_blocks


class IndexSplit:
    """A split whose rows are their own indices, to follow which rows a loader hands out."""

    directory = Path("index-split")

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rows(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(index)[:, None]

    def blocks(self) -> Blocks:
        return uniform_blocks(self.n, 1)

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.zeros(len(index), dtype=np.int64)
