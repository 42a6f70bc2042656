"""The order rows are trained in: block-window shuffling, world-size independent, computed lazily.

A dataset's rows lie in *blocks* (a few hundred KiB of consecutive rows of one shard, one source;
the unit a streaming rank fetches and verifies). An epoch of one mixture stage is:

1. each source's share of the epoch's rows (by weight), taken as whole blocks in a seeded
   permutation of that source's blocks (repeated when a weight asks for more rows than it has;
   the last block cut short to the exact count);
2. those *segments* of all sources in one seeded permutation (so the sources interleave);
3. consecutive groups of `WINDOW_BLOCKS` segments form *windows*; the rows of each window are
   shuffled with a generator seeded by (seed, epoch, stage, window).

Step 2 is a full permutation at block level and step 3 at row level within a window, so a global
batch mixes rows of many blocks, while a reader needs only the blocks of one window at a time
(this is MosaicML Streaming's "shuffle block" idea, without canonical nodes: the order depends on
the seed, the blocks and the weights, never on the world size). An epoch costs O(blocks) to set up
and O(window) per window, never O(rows): a 10T-token corpus has ~10^7 blocks and ~10^9 rows.
A dataset whose blocks are single rows (labelled fine-tuning sets) gets a full row permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Segments (about blocks) per shuffle window.
WINDOW_BLOCKS = 256
#: Windows of one epoch kept computed (a step spans at most a few).
KEEP_WINDOWS = 4


@dataclass(frozen=True)
class Blocks:
    """Where a split's blocks lie: block b is rows [starts[b], starts[b+1]) of source sources[b]."""

    starts: np.ndarray[Any, Any]
    sources: np.ndarray[Any, Any]

    @property
    def rows(self) -> np.ndarray[Any, Any]:
        return np.diff(self.starts)

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = self.sources[self.block_of(index)]
        return out

    def block_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.searchsorted(self.starts, index, side="right") - 1


def uniform_blocks(rows: int, block_rows: int, source: int = 0) -> Blocks:
    """Blocks of `block_rows` rows (the last one shorter) over `rows` rows of one source."""
    starts = np.append(np.arange(0, rows, block_rows, dtype=np.int64), rows)
    return Blocks(starts, np.full(len(starts) - 1, source, dtype=np.int64))


def source_counts(blocks: Blocks, weights: list[float], total: int) -> dict[int, int]:
    """Rows of each source in an epoch of `total` rows: shares by weight (a source the weights do
    not name weighs 1), the rounding remainder handed to weighted sources, in source order."""
    present = sorted({int(s) for s in np.unique(blocks.sources)})
    if len(present) == 1:
        return {present[0]: total}
    w = np.array([weights[s] if s < len(weights) else 1.0 for s in present], dtype=np.float64)
    counts = np.floor(w / w.sum() * total).astype(np.int64)
    weighted = np.flatnonzero(w > 0)
    counts[weighted[: total - counts.sum()]] += 1
    return {s: int(n) for s, n in zip(present, counts, strict=True)}


def _source_segments(
    blocks: Blocks, source: int, count: int, rng: np.random.Generator
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(block ids, rows taken from each block's start) giving `count` rows of `source`."""
    mine = np.flatnonzero(blocks.sources == source)
    rows = blocks.rows[mine]
    reps = max(1, -(-count // int(rows.sum())))
    chosen = np.concatenate([rng.permutation(mine) for _ in range(reps)])
    taken = blocks.rows[chosen]
    ends = np.cumsum(taken)
    n = int(np.searchsorted(ends, count, side="left")) + 1 if count else 0
    chosen, taken = chosen[:n], taken[:n].copy()
    if n:
        taken[-1] -= int(ends[n - 1]) - count  # the last block cut to the exact count
    return chosen, taken


class EpochOrder:
    """The rows of one epoch (of one mixture stage) in training order, a window at a time."""

    def __init__(self, blocks: Blocks, weights: list[float], seed: int, epoch: int, stage: int = 0) -> None:
        self.blocks = blocks
        self.key = [seed, epoch] if stage == 0 else [seed, epoch, stage]
        rng = np.random.default_rng(self.key)
        total = int(blocks.starts[-1])
        parts = [_source_segments(blocks, s, n, rng) for s, n in source_counts(blocks, weights, total).items() if n]
        block_ids = np.concatenate([p[0] for p in parts])
        taken = np.concatenate([p[1] for p in parts])
        perm = rng.permutation(len(block_ids))
        self.segment_block, self.segment_rows = block_ids[perm], taken[perm]
        ends = np.cumsum(self.segment_rows)
        #: Epoch position where each window starts, and the end.
        self.window_starts = np.append(np.concatenate([[0], ends])[: len(ends) : WINDOW_BLOCKS], total)
        self._windows: dict[int, np.ndarray[Any, Any]] = {}

    def __len__(self) -> int:
        return int(self.window_starts[-1])

    def window(self, w: int) -> np.ndarray[Any, Any]:
        """Global row indices of window `w`, in training order."""
        if w not in self._windows:
            if len(self._windows) >= KEEP_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            segs = slice(w * WINDOW_BLOCKS, (w + 1) * WINDOW_BLOCKS)
            first = self.blocks.starts[self.segment_block[segs]]
            counts = self.segment_rows[segs]
            rows = np.repeat(first - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
            self._windows[w] = rows[np.random.default_rng([*self.key, w, 0]).permutation(len(rows))]
        return self._windows[w]

    def __getitem__(self, positions: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Global row indices at epoch positions `positions` (each in [0, len))."""
        which = np.searchsorted(self.window_starts, positions, side="right") - 1
        out = np.empty(len(positions), dtype=np.int64)
        for w in np.unique(which):
            sel = which == w
            out[sel] = self.window(int(w))[positions[sel] - self.window_starts[w]]
        return out
