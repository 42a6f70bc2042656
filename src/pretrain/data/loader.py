"""The training loader: prepared shards, memory-mapped, in one global order that every rank cuts.

The order is a *stream*: epoch e is a seeded block-window shuffle of the rows (order.py; a
weighted draw when there are several sources), epochs follow one another, and optimizer step s consumes stream
items [s*G, (s+1)*G) where G is the global batch. Rank r takes, for micro step m, the items at
offset (m*world + r)*micro within that window. So ranks never overlap, an epoch covers every
row, and the loader's whole state is one number (`consumed`): a resumed run sees exactly the
sequences an uninterrupted one would, even at another world size.

A split that streams its shards (stream.RemoteSplit) is told, step by step, which rows this rank
reads a few steps ahead (`prefetch`), so that its cache fetches them before the step needs them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pretrain.data.layout import layout
from pretrain.data.order import WINDOW_BLOCKS, Blocks, EpochOrder
from pretrain.data.sources import DataError
from pretrain.storage.paths import UnsafePath, inside

log = logging.getLogger("pretrain.data")
#: The row order's name, kept in the loader state: a resume under another order says so.
ORDER = f"block-windows-{WINDOW_BLOCKS}"


class Split(Protocol):
    """What the loader needs of a split: packed shards, local (PackedSplit) or streamed
    (stream.RemoteSplit), or labelled features."""

    directory: Path

    def __len__(self) -> int: ...
    def rows(self, index: np.ndarray[Any, Any]) -> Any: ...
    def blocks(self) -> Blocks: ...
    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]: ...


class PackedSplit:
    """Rows of one split (train or val) across its shards on a local disk, opened lazily with np.memmap."""

    def __init__(self, directory: Path, split: str) -> None:
        manifest_path = directory / "manifest.json"
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{manifest_path}: unreadable dataset manifest ({e.__class__.__name__})") from None
        self.directory = directory
        self.layout = layout(self.manifest, split, str(directory))
        self.seq_len, self.dtype, self.shards = self.layout.seq_len, self.layout.dtype, self.layout.shards
        self._maps: dict[int, np.memmap[Any, Any]] = {}
        for s in self.shards:
            try:  # a cache from a bucket: its manifest's names stay inside the cache folder
                path = inside(directory, str(s["file"]), "dataset manifest: shard")
            except UnsafePath as e:
                raise DataError(str(e)) from None
            expected = s["rows"] * self.layout.row_bytes
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                what = "missing" if size < 0 else f"{size} bytes, expected {expected}: truncated or corrupt"
                raise DataError(f"shard {path}: {what}")

    def __len__(self) -> int:
        return int(self.layout.offsets[-1])

    def _map(self, shard: int) -> np.memmap[Any, Any]:
        if shard not in self._maps:
            s = self.shards[shard]
            self._maps[shard] = np.memmap(
                self.directory / s["file"], dtype=self.dtype, mode="r", shape=(s["rows"], self.seq_len)
            )
        return self._maps[shard]

    def rows(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Rows at global indices `index`, as int64 (len(index), seq_len)."""
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        offsets = self.layout.offsets
        shard_of = np.searchsorted(offsets, index, side="right") - 1
        for k, (i, sh) in enumerate(zip(index, shard_of, strict=True)):
            out[k] = self._map(int(sh))[int(i - offsets[sh])]
        self.layout.check_ids(out, shard_of, str(self.directory))
        return out

    def blocks(self) -> Blocks:
        return self.layout.blocks

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The source of each row at global indices `index` (one search over the blocks)."""
        return self.layout.blocks.source_of(index)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads them all)."""
        import hashlib

        for s in self.shards:
            h = hashlib.sha256()
            with open(self.directory / s["file"], "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != s["sha256"]:
                raise DataError(f"shard {self.directory / s['file']}: checksum mismatch (corrupt)")


class DistributedLoader:
    """Gives one rank its micro-batches, step by step, from the global stream."""

    def __init__(
        self,
        split: Split,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        accumulation: int,
        seed: int,
        weights: list[float] | None = None,
        stages: list[tuple[int | None, list[float]]] | None = None,
    ) -> None:
        if len(split) == 0:
            raise DataError(f"{split.directory}: the training split is empty")
        self.split = split
        self.blocks = split.blocks()
        self.rank, self.world, self.micro, self.accum, self.seed = rank, world_size, micro_batch, accumulation, seed
        self.weights = weights or []
        #: (stream position where the stage ends, or None, weights): the mixture by position.
        self.stages: list[tuple[int | None, list[float]]] = list(stages or [(None, self.weights)])
        self.stages[-1] = (None, self.stages[-1][1])  # the last stage lasts to the end
        self.global_batch = micro_batch * accumulation * world_size
        self.consumed = 0
        self._planned = 0  # stream position up to which a streaming split was told what comes
        self._steps = 0  # steps taken by this loader object (since it was made or restored)
        self._orders: dict[tuple[int, int], EpochOrder] = {}
        #: Rows the whole job has trained on, by source, since the run began (every rank counts
        #: the same global window; kept in the checkpoint's loader state).
        self.source_rows: dict[int, int] = {}
        #: Stream ranges [from, to) left out by rollbacks past bad data (skip_to).
        self.skipped: list[tuple[int, int]] = []

    def _order(self, stage: int, epoch: int) -> EpochOrder:
        key = (stage, epoch)
        if key not in self._orders:
            self._orders = {k: o for k, o in self._orders.items() if k >= (stage, epoch - 1)}
            self._orders[key] = EpochOrder(self.blocks, self.stages[stage][1], self.seed, epoch, stage)
        return self._orders[key]

    def stream(self, start: int, count: int) -> np.ndarray[Any, Any]:
        """Global row indices at stream positions [start, start+count): within each mixture
        stage, its epochs one after another (positions counted from the stage's start)."""
        n = len(self.split)
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        begin = 0
        for stage, (end, _) in enumerate(self.stages):
            in_stage = (pos >= begin) & (pos < end) if end is not None else pos >= begin
            local = pos[in_stage] - begin
            for epoch in np.unique(local // n):
                sel = local // n == epoch
                idx = np.flatnonzero(in_stage)[sel]
                out[idx] = self._order(stage, int(epoch))[local[sel] % n]
            if end is None:
                break
            begin = end
        return out

    @property
    def epoch(self) -> int:
        return self.consumed // len(self.split)

    def next_step(self) -> list[Any]:
        """This rank's `accumulation` micro-batches (int64 arrays micro x seq_len) for one step."""
        self._prefetch()
        window = self.stream(self.consumed, self.global_batch)
        batches = [self.split.rows(rows) for rows in self._mine(window)]
        self._count_sources(window)
        self.consumed += self.global_batch
        return batches

    def _mine(self, window: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        """This rank's micro-batches of one step's global window."""
        starts = [(m * self.world + self.rank) * self.micro for m in range(self.accum)]
        return [window[s : s + self.micro] for s in starts]

    def _prefetch(self) -> None:
        """Tell a streaming split the rows this rank reads in this step and the next few (each
        step once), so that its blocks are fetched before the step needs them."""
        prefetch = getattr(self.split, "prefetch", None)
        if prefetch is None:
            return
        ahead = min(self._steps, self.split.prefetch_steps(self.micro * self.accum))  # type: ignore[attr-defined]
        self._steps += 1  # the horizon grows a step a step: the first step fetches only what it reads
        end = self.consumed + (ahead + 1) * self.global_batch
        start = max(self._planned, self.consumed)
        for pos in range(start, end, self.global_batch):
            prefetch(np.concatenate(self._mine(self.stream(pos, self.global_batch))))
        self._planned = max(self._planned, end)

    def skip_to(self, position: int) -> tuple[int, int]:
        """Move on to stream `position`, leaving out the rows before it (a rollback past a bad
        window: guard.py); the range left out, which the state keeps."""
        left_out = (self.consumed, position)
        self.skipped.append(left_out)
        self.consumed = position
        return left_out

    def _count_sources(self, index: np.ndarray[Any, Any]) -> None:
        sources, counts = np.unique(self.split.source_of(index), return_counts=True)
        for src, n in zip(sources.tolist(), counts.tolist(), strict=True):
            self.source_rows[int(src)] = self.source_rows.get(int(src), 0) + int(n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "rows": len(self.split),
            "global_batch": self.global_batch,
            "source_rows": {str(k): v for k, v in sorted(self.source_rows.items())},
            "order": ORDER,
            "skipped": [list(r) for r in self.skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != len(self.split) or state["seed"] != self.seed:
            raise DataError(
                f"{self.split.directory}: the checkpoint's loader state is for another dataset "
                f"({state['rows']} rows, seed {state['seed']}; this one has {len(self.split)}, seed {self.seed})"
            )
        self.consumed = int(state["consumed"])
        if state.get("order") != ORDER and self.rank == 0:
            log.warning("the checkpoint's loader state is from an earlier row order (%s): the run goes on at stream "
                        "position %d in the current order (%s)", state.get("order", "a full permutation per epoch"),
                        self.consumed, ORDER)  # fmt: skip
        self.skipped = [(int(a), int(b)) for a, b in state.get("skipped", [])]
        if "source_rows" in state:
            self.source_rows = {int(k): int(v) for k, v in state["source_rows"].items()}
            return
        self.source_rows = {}  # a checkpoint from before the count: recount the stream, in chunks
        for start in range(0, self.consumed, 1 << 20):
            self._count_sources(self.stream(start, min(1 << 20, self.consumed - start)))


def eval_batches(
    split: Split, *, rank: int, world_size: int, micro_batch: int, steps: int
) -> list[np.ndarray[Any, Any]]:
    """A fixed evaluation set: the first steps x world x micro validation rows, strided by rank."""
    n = len(split)
    if n == 0:
        return []
    out = []
    for s in range(steps):
        start = (s * world_size + rank) * micro_batch
        idx = np.arange(start, start + micro_batch) % n
        out.append(split.rows(idx))
    return out
