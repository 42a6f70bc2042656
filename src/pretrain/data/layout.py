"""One split of a prepared dataset as its manifest lays it out: shards, rows, blocks, sources.

Shared by the two readers of packed data: `loader.PackedSplit` (shards on a local disk,
memory-mapped) and `stream.RemoteSplit` (shards in object storage, read block by block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.data.order import Blocks
from pretrain.data.sources import DataError
from pretrain.data.units import block_rows_for


@dataclass(frozen=True)
class Layout:
    seq_len: int
    dtype: np.dtype[Any]
    #: Token ids must be below this (the tokenizer's vocabulary): a larger one is corruption.
    id_bound: int
    shards: list[dict[str, Any]]
    #: First global row of each shard, and the end.
    offsets: np.ndarray[Any, Any]
    block_rows: int
    blocks: Blocks
    #: The shard of each block.
    block_shard: np.ndarray[Any, Any]

    @property
    def row_bytes(self) -> int:
        return self.seq_len * self.dtype.itemsize

    def block_span(self, block: int) -> tuple[int, int, int]:
        """(shard, first row within the shard, rows) of a block."""
        shard = int(self.block_shard[block])
        first = int(self.blocks.starts[block] - self.offsets[shard])
        return shard, first, int(self.blocks.starts[block + 1] - self.blocks.starts[block])

    def check_ids(self, out: np.ndarray[Any, Any], shard_of_row: np.ndarray[Any, Any], where: str) -> None:
        """Token ids at or above the vocabulary are corruption: one pass over the batch, cheap
        beside a step."""
        if out.size and int(out.max()) >= self.id_bound:
            k = int(np.argmax(out.max(axis=1)))
            name = self.shards[int(shard_of_row[k])]["file"]
            raise DataError(f"shard {where}/{name}: token id {int(out[k].max())} is not below the vocabulary "
                            f"({self.id_bound}): corrupt")  # fmt: skip


def layout(manifest: dict[str, Any], split: str, where: str) -> Layout:
    """The layout of `split` in a dataset manifest; a DataError naming `where` if it is malformed."""
    try:
        seq_len = int(manifest["sequence_length"])
        dtype = np.dtype(manifest["dtype"])
        shards: list[dict[str, Any]] = manifest["splits"][split]["shards"]
        rows = np.array([int(s["rows"]) for s in shards], dtype=np.int64)
        sources = np.array([int(s["source"]) for s in shards], dtype=np.int64)
        block_rows = int(manifest.get("block_rows") or block_rows_for(seq_len, dtype))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}/manifest.json: not a dataset manifest ({e.__class__.__name__}: {e})") from None
    if seq_len < 1 or block_rows < 1 or (rows < 0).any() or dtype.kind != "u":
        raise DataError(f"{where}/manifest.json: not a dataset manifest (sequence length, block rows or dtype)")
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    per_shard = -(-rows // block_rows)
    block_shard = np.repeat(np.arange(len(shards), dtype=np.int64), per_shard)
    within = np.arange(len(block_shard), dtype=np.int64) - np.repeat(np.cumsum(per_shard) - per_shard, per_shard)
    starts = np.append(offsets[block_shard] + within * block_rows, offsets[-1]).astype(np.int64)
    bound = int(manifest.get("vocab_size") or np.iinfo(dtype).max + 1)
    return Layout(seq_len, dtype, bound, shards, offsets, block_rows, Blocks(starts, sources[block_shard]), block_shard)
