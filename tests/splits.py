"""Test doubles of the data layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class IndexSplit:
    """A split whose rows are their own indices, to follow which rows a loader hands out."""

    directory = Path("index-split")

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rows(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(index)[:, None]

    def source_ranges(self) -> dict[int, np.ndarray[Any, Any]]:
        return {0: np.arange(self.n)}

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.zeros(len(index), dtype=np.int64)
