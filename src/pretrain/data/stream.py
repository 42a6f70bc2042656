"""Training rows streamed from a dataset in object storage: no node downloads the corpus.

`RemoteSplit` reads a prepared dataset where it lies (`<data.cacheUri>/<fingerprint>/`, any
fsspec URI). Its manifest says where every block of rows is (layout.py); a row is read from
its block, which is fetched with one ranged read, checked against its sha256 (from the shard's
block digests, themselves checked against the manifest), and kept in a node-local cache folder
bounded in bytes (`BlockCache`: least recently used blocks go first). The loader tells it the
rows this rank reads in the next steps (`prefetch`), and a background thread fetches their
blocks in that order, so the step rarely waits for storage. Setting up costs one manifest read:
the same for 1 GB or 10 TB; a rank then holds at most its cache bound.

A block that is missing, short or fails its hash stops the run with one line naming the shard
and the block: nothing is trained on unverified bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.layout import Layout, layout
from pretrain.data.order import Blocks
from pretrain.data.parts import block_digests_name
from pretrain.data.sources import DataError
from pretrain.storage.fs import with_retries

log = logging.getLogger("pretrain.data")

#: Largest dataset manifest read (a 10T-token corpus has ~150k shards, ~25 MB of manifest).
MAX_MANIFEST_BYTES = 1 << 30
#: Steps fetched ahead of the one being trained, at most.
PREFETCH_STEPS = 8
#: Blocks fetched at once: storage latency, not bandwidth, bounds one request at a time.
PREFETCH_THREADS = 4
#: Shards whose block digests are kept in memory (32 bytes a block: ~4 KiB a shard).
KEEP_DIGESTS = 4096


def read_manifest(fs: Any, root: str, uri: str) -> dict[str, Any]:
    """The dataset manifest at `root` (bounded read), or one DataError naming `uri`."""
    path = f"{root}/manifest.json"
    try:
        size = int(with_retries("read manifest.json", lambda: fs.size(path)))
        if size > MAX_MANIFEST_BYTES:
            raise DataError(f"{uri}/manifest.json: {size} bytes, over the {MAX_MANIFEST_BYTES} a manifest may have")
        data = with_retries("read manifest.json", lambda: fs.cat_file(path))
        manifest: dict[str, Any] = json.loads(data)
    except FileNotFoundError:
        raise DataError(f"{uri}: no dataset manifest (not prepared, or not committed yet)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{uri}/manifest.json: unreadable dataset manifest ({e.__class__.__name__})") from None
    return manifest


class BlockCache:
    """Verified blocks as files in a node-local folder, at most `limit` bytes together (least
    recently used out first); thread-safe. A block being fetched by one thread is waited for by
    another, never fetched twice."""

    def __init__(self, folder: Path, limit: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # a restarted process trusts nothing unverified
        folder.mkdir(parents=True)
        self.folder, self.limit = folder, limit
        self.size = self.peak = 0
        self._files: OrderedDict[int, int] = OrderedDict()  # block -> bytes, least recently used first
        self._maps: dict[int, np.memmap[Any, Any]] = {}
        self._fetching: set[int] = set()
        self._cond = threading.Condition()

    def get(self, block: int, fetch: Any, shape: tuple[int, int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """Block `block`'s rows, fetching them (`fetch()` -> verified bytes) when not cached."""
        with self._cond:
            while block in self._fetching:
                self._cond.wait()
            if block in self._files:
                self._files.move_to_end(block)
                return self._maps[block]
            self._fetching.add(block)
        try:
            return self._store(block, fetch(), shape, dtype)
        finally:
            with self._cond:
                self._fetching.discard(block)
                self._cond.notify_all()

    def has(self, block: int) -> bool:
        with self._cond:
            return block in self._files or block in self._fetching

    def _store(self, block: int, data: bytes, shape: tuple[int, int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        with self._cond:
            while self._files and self.size + len(data) > self.limit:
                old, n = self._files.popitem(last=False)
                self._maps.pop(old, None)  # a reader holding the map keeps its pages; the name goes
                (self.folder / f"{old}.bin").unlink(missing_ok=True)
                self.size -= n
            if self.size + len(data) > self.limit:
                raise DataError(f"data.streamCache: a block of {len(data)} bytes does not fit in this rank's "
                                f"{self.limit} bytes of cache")  # fmt: skip
            tmp = self.folder / f"{block}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / f"{block}.bin")
            self._files[block] = len(data)
            self.size += len(data)
            self.peak = max(self.peak, self.size)
            self._maps[block] = np.memmap(self.folder / f"{block}.bin", dtype=dtype, mode="r", shape=shape)
            return self._maps[block]

    def disk_bytes(self) -> int:
        """What the cache folder holds on disk now (its writers paused meanwhile)."""
        with self._cond:
            return sum(p.stat().st_size for p in self.folder.iterdir())


class RemoteSplit:
    """Rows of one split of a dataset in object storage, read block by block (see the module)."""

    def __init__(self, uri: str, split: str, cache_folder: Path, cache_bytes: int,
                 manifest: dict[str, Any] | None = None) -> None:  # fmt: skip
        import fsspec

        self.uri = uri.rstrip("/")
        self.directory = Path(self.uri)  # for messages: where the split is
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.manifest = manifest if manifest is not None else read_manifest(self.fs, self.root, self.uri)
        self.layout: Layout = layout(self.manifest, split, self.uri)
        self.seq_len = self.layout.seq_len
        block_bytes = self.layout.block_rows * self.layout.row_bytes
        if cache_bytes < 2 * block_bytes:
            raise DataError(f"data.streamCache: {cache_bytes} bytes for this rank hold fewer than 2 blocks of "
                            f"{block_bytes} bytes")  # fmt: skip
        self.cache = BlockCache(cache_folder, cache_bytes)
        self._digests: OrderedDict[int, bytes] = OrderedDict()
        self._digest_lock = threading.Lock()
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._prefetchers: list[threading.Thread] = []
        self.fetched = 0  # blocks read from storage, for the benchmark and the tests

    def __len__(self) -> int:
        return int(self.layout.offsets[-1])

    def blocks(self) -> Blocks:
        return self.layout.blocks

    def source_of(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return self.layout.blocks.source_of(index)

    def rows(self, index: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Rows at global indices `index`, as int64 (len(index), seq_len)."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        block_of = self.layout.blocks.block_of(index)
        for b in np.unique(block_of):
            sel = block_of == b
            out[sel] = self._block(int(b))[index[sel] - self.layout.blocks.starts[b]]
        self.layout.check_ids(out, self.layout.block_shard[block_of], self.uri)
        return out

    def prefetch_steps(self, rows_per_step: int) -> int:
        """Steps to fetch ahead: as many as half the cache holds at one block per row (at most
        PREFETCH_STEPS), so what is fetched ahead never pushes out what the step reads."""
        block_bytes = self.layout.block_rows * self.layout.row_bytes
        return max(1, min(PREFETCH_STEPS, self.cache.limit // 2 // (rows_per_step * block_bytes)))

    def prefetch(self, index: np.ndarray[Any, Any]) -> None:
        """Fetch, in the background and in this order, the blocks of rows read soon."""
        while len(self._prefetchers) < PREFETCH_THREADS:
            t = threading.Thread(target=self._prefetch_loop, name="pretrain-prefetch", daemon=True)
            t.start()
            self._prefetchers.append(t)
        block_of = self.layout.blocks.block_of(np.asarray(index, dtype=np.int64))
        _, first = np.unique(block_of, return_index=True)
        for b in block_of[np.sort(first)]:
            if not self.cache.has(int(b)):
                self._queue.put(int(b))

    def close(self) -> None:
        """Stop the prefetch threads (they hold no state worth waiting for)."""
        for _ in self._prefetchers:
            self._queue.put(None)
        for t in self._prefetchers:
            t.join(timeout=30)
        self._prefetchers = []

    def _prefetch_loop(self) -> None:
        while (block := self._queue.get()) is not None:
            with contextlib.suppress(Exception):  # the step's own read fetches it again and says what is wrong
                self._block(block)

    def _block(self, block: int) -> np.ndarray[Any, Any]:
        _, _, rows = self.layout.block_span(block)
        return self.cache.get(block, lambda: self._fetch(block), (rows, self.seq_len), self.layout.dtype)

    def _fetch(self, block: int) -> bytes:
        """The bytes of `block`, read with one ranged request and verified."""
        shard, first, rows = self.layout.block_span(block)
        name = self.layout.shards[shard]["file"]
        where = f"shard {self.uri}/{name} block {(first // self.layout.block_rows)} (rows {first}-{first + rows - 1})"
        start, end = first * self.layout.row_bytes, (first + rows) * self.layout.row_bytes
        data = self._read(name, start, end, where)
        if len(data) != end - start:
            raise DataError(f"{where}: {len(data)} bytes, expected {end - start}: truncated")
        if hashlib.sha256(data).digest() != self._digest(shard, first // self.layout.block_rows):
            raise DataError(f"{where}: fails its sha256 check (corrupt)")
        self.fetched += 1
        return bytes(data)

    def _read(self, name: str, start: int, end: int, where: str) -> bytes:
        path = f"{self.root}/{_inside(name, self.uri)}"
        try:
            data: bytes = with_retries(f"read {name}", lambda: self.fs.cat_file(path, start=start, end=end))
        except FileNotFoundError:
            raise DataError(f"{where}: missing") from None
        except OSError as e:
            raise DataError(f"{where}: cannot read ({e.__class__.__name__}: {e})") from None
        return data

    def _digest(self, shard: int, block_in_shard: int) -> bytes:
        with self._digest_lock:
            digests = self._digests.get(shard)
        if digests is None:
            digests = self._shard_digests(shard)
            with self._digest_lock:
                self._digests[shard] = digests
                while len(self._digests) > KEEP_DIGESTS:
                    self._digests.popitem(last=False)
        return digests[32 * block_in_shard : 32 * block_in_shard + 32]

    def _shard_digests(self, shard: int) -> bytes:
        s = self.layout.shards[shard]
        name = block_digests_name(str(s["file"]))
        n = -(-int(s["rows"]) // self.layout.block_rows)
        where = f"shard {self.uri}/{s['file']}: its block digests {name}"
        data = self._read(name, 0, 32 * n, where)
        if len(data) != 32 * n or hashlib.sha256(data).hexdigest() != s.get("blocks_sha256"):
            raise DataError(f"{where} do not match the manifest (corrupt or from another preparation)")
        return data


def _inside(name: str, uri: str) -> str:
    """A shard name from the manifest, refused when it would leave the dataset's folder."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise DataError(f"{uri}/manifest.json: shard name {name[:100]!r} leaves the dataset's folder")
    return name
