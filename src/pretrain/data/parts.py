"""Preparation in parts: worker k of n tokenizes and packs its units (units.py) into shards and
writes a part manifest, last; `commit` joins the n parts into the dataset manifest.

One process (`prepare`), a pool on one machine (`pretrain data prepare --workers N`) and the
pods of an Indexed Job (`--index k --count N`) run this same code, and make the same shards: a
unit's shards are named by the unit (`u000042-train-000000.bin`), whoever made them.

A unit gives its last `ceil(rows * validationSplit)` rows to validation (with validation sources,
none: those sources' units give all theirs), so that validation samples the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data import units
from pretrain.data.encode import BatchEncoder
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import id_bound
from pretrain.data.units import (
    FORMAT_VERSION,
    Inputs,
    Unit,
    block_rows_for,
    plan_units,
    token_dtype,
    unit_documents,
    units_of,
)

#: Rows per shard file (about 64M tokens at sequence length 1024).
DEFAULT_SHARD_ROWS = 65536
#: Documents (or characters) handed to the tokenizer at once (its Rust side runs a batch on all cores).
ENCODE_BATCH = 1024
ENCODE_CHARS = 4 * 2**20


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    source: int
    sha256: str
    #: sha256 of the shard's block digests (`block_digests_name(file)`): the one manifest entry
    #: that lets a streaming reader verify any block of the shard without reading the rest.
    blocks_sha256: str


def block_digests_name(shard_file: str) -> str:
    """The file beside a shard that holds the sha256 digest (32 bytes) of each of its blocks."""
    return f"{shard_file}.blocks"


class ShardWriter:
    """Appends rows to numbered shard files `<prefix>-NNNNNN.bin`, hashing the shard and each
    block of `block_rows` rows (from the shard's start) as it goes."""

    def __init__(
        self, directory: Path, prefix: str, dtype: np.dtype[Any], shard_rows: int, bound: int, block_rows: int
    ) -> None:
        self.directory, self.prefix, self.dtype = directory, prefix, dtype
        self.shard_rows, self.id_bound, self.block_rows = shard_rows, bound, block_rows
        self.shards: list[Shard] = []
        self._fh: Any = None
        self._hash: Any = None
        self._block: Any = None
        self._digests: list[bytes] = []
        self._rows = 0
        self._source = -1
        self._name = ""

    def _open(self, source: int) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.bin"
        self._fh = open(self.directory / self._name, "wb")  # noqa: SIM115 - closed in _close
        self._hash, self._block, self._digests = hashlib.sha256(), hashlib.sha256(), []
        self._rows = 0
        self._source = source

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        if self._rows % self.block_rows:
            self._digests.append(self._block.digest())
        digests = b"".join(self._digests)
        (self.directory / block_digests_name(self._name)).write_bytes(digests)
        self.shards.append(Shard(self._name, self._rows, self._source, self._hash.hexdigest(),
                                 hashlib.sha256(digests).hexdigest()))  # fmt: skip
        self._fh = None

    def _append(self, block: np.ndarray[Any, Any]) -> None:
        """Rows that fit in the open shard, hashed into its blocks."""
        row_bytes = block.shape[1] * self.dtype.itemsize
        data = block.tobytes()
        self._fh.write(data)
        self._hash.update(data)
        done = 0
        while done < len(block):
            take = min(len(block) - done, self.block_rows - self._rows % self.block_rows)
            self._block.update(data[done * row_bytes : (done + take) * row_bytes])
            done += take
            self._rows += take
            if self._rows % self.block_rows == 0:
                self._digests.append(self._block.digest())
                self._block = hashlib.sha256()

    def write(self, rows: np.ndarray[Any, Any], source: int) -> None:
        start = 0
        while start < len(rows):
            if self._fh is None or self._rows >= self.shard_rows or self._source != source:
                self._close()
                self._open(source)
            take = min(len(rows) - start, self.shard_rows - self._rows)
            block = np.ascontiguousarray(rows[start : start + take], dtype=self.dtype)
            if block.size and int(block.max()) >= self.id_bound:
                raise DataError(f"shard {self._name}: token id {int(block.max())} is not below the tokenizer's "
                                f"vocabulary ({self.id_bound}); the tokenizer is inconsistent")  # fmt: skip
            self._append(block)
            start += take

    def close(self) -> list[Shard]:
        self._close()
        return self.shards


def _batches(docs: Iterator[str], counter: list[int]) -> Iterator[list[str]]:
    """Non-empty documents in batches of ENCODE_BATCH documents or ENCODE_CHARS characters;
    counter[0] counts the documents."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        if not doc:
            continue
        batch.append(doc)
        counter[0] += 1
        chars += len(doc)
        if len(batch) >= ENCODE_BATCH or chars >= ENCODE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pack(docs: Iterator[str], encoder: BatchEncoder, seq_len: int, out: Path, dtype: np.dtype[Any]) -> tuple[int, int]:
    """Tokenize documents into a flat file of rows (the last partial row dropped); (rows, documents)."""
    carry = np.zeros(0, dtype=dtype)
    rows = 0
    count = [0]
    with open(out, "wb") as fh:
        for flat in encoder.map(_batches(docs, count)):
            stream = np.concatenate([carry, flat]) if len(carry) else flat
            n = len(stream) // seq_len
            if n:
                fh.write(stream[: n * seq_len].tobytes())
                rows += n
            carry = stream[n * seq_len :].copy()
    return rows, count[0]


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.json"


def _prepare_unit(
    u: int, unit: Unit, spec: DataSpec, encoder: BatchEncoder, out: Path, shard_rows: int, bound: int
) -> dict[str, Any]:
    """Pack one unit into its train and val shards; its entry in the part manifest."""
    src: DataSourceSpec = [*spec.sources, *spec.validation_sources][unit.source]
    dtype, seq = token_dtype(bound), spec.sequence_length
    flat = out / f".u{u:06d}.rows"
    rows, docs = _pack(unit_documents(src, unit), encoder, seq, flat, dtype)
    validation_only = unit.source >= len(spec.sources)
    n_val = rows if validation_only else (0 if spec.validation_sources else math.ceil(rows * spec.validation_split))
    block_rows = block_rows_for(seq, dtype)
    train = ShardWriter(out, f"u{u:06d}-train", dtype, shard_rows, bound, block_rows)
    val = ShardWriter(out, f"u{u:06d}-val", dtype, shard_rows, bound, block_rows)
    if rows:
        data = np.memmap(flat, dtype=dtype, mode="r", shape=(rows, seq))
        train.write(data[: rows - n_val], unit.source)
        val.write(data[rows - n_val :], unit.source)
        del data
    flat.unlink()
    return {"unit": u, "source": unit.source, "file": unit.file.uri, "start": unit.start, "end": unit.end,
            "documents": docs, "rows": rows, "val_rows": n_val,
            "train": [asdict(s) for s in train.close()], "val": [asdict(s) for s in val.close()]}  # fmt: skip


def prepare_part(
    spec: DataSpec, tokenizer: Any, inputs: Inputs, out: Path, index: int, count: int, *,
    shard_rows: int = DEFAULT_SHARD_ROWS, encode_workers: int | None = None,
) -> Path:  # fmt: skip
    """Prepare worker `index` of `count`'s units into `out`; its part manifest, written last.
    A part already written for the same dataset is kept (a retried worker redoes nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / part_name(index, count)
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("fingerprint") == inputs.fingerprint:
                return manifest
        except ValueError:
            pass  # torn: made again
    units = plan_units(spec, inputs)
    bound = id_bound(tokenizer)
    with BatchEncoder(tokenizer, token_dtype(bound), workers=encode_workers) as encoder:
        entries = [_prepare_unit(u, units[u], spec, encoder, out, shard_rows, bound)
                   for u in units_of(count, index, len(units))]  # fmt: skip
    part = {"format_version": FORMAT_VERSION, "fingerprint": inputs.fingerprint, "index": index, "count": count,
            "vocab_size": bound, "units": entries}  # fmt: skip
    tmp = manifest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(part, indent=1))
    os.replace(tmp, manifest)
    return manifest


def _read_part(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        part: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: this part is missing: run its worker (again)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable part manifest ({e.__class__.__name__}): run its worker again") from None
    if part.get("fingerprint") != fingerprint or part.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: prepared for dataset {part.get('fingerprint')}, not {fingerprint}")
    return part


def commit(spec: DataSpec, inputs: Inputs, out: Path, count: int, tokenizer_fingerprint: str) -> dict[str, Any]:
    """The dataset manifest of the `count` parts in `out` (every unit exactly once, in unit
    order), or a DataError naming the part or source at fault. The caller writes it, last."""
    n_units = len(plan_units(spec, inputs))
    parts = [_read_part(out / part_name(k, count), inputs.fingerprint) for k in range(count)]
    bounds = {p["vocab_size"] for p in parts}
    if len(bounds) != 1:
        raise DataError(f"{out}: parts made with different tokenizers (vocabularies {sorted(bounds)})")
    entries = {e["unit"]: e for p in parts for e in p["units"]}
    if sorted(entries) != list(range(n_units)):
        raise DataError(f"{out}: the parts cover units {sorted(entries)[:8]}..., not the {n_units} units planned")
    ordered = [entries[u] for u in range(n_units)]
    seq, bound = spec.sequence_length, bounds.pop()
    sources = []
    for i, src in enumerate([*spec.sources, *spec.validation_sources]):
        mine = [e for e in ordered if e["source"] == i]
        rows, val, docs = (sum(e[k] for e in mine) for k in ("rows", "val_rows", "documents"))
        if rows == 0:
            what = "sequence" if i < len(spec.sources) else "validation sequence"
            raise DataError(f"{src.uri}: too little text for one {what} of {seq} tokens ({docs} documents)")
        if i < len(spec.sources) and rows - val < 1:
            raise DataError(f"{src.uri}: {rows} sequences leave none for training after the validation split")
        if i < len(spec.sources):
            sources.append({"uri": src.uri, "fingerprint": inputs.prints[i], "weight": src.weight, "documents": docs,
                            "files": [f.uri for f in inputs.files[i]], "rows": rows, "val_rows": val})  # fmt: skip
    splits = {}
    for name in ("train", "val"):
        shards = [s for e in ordered for s in e[name]]
        rows = sum(s["rows"] for s in shards)
        splits[name] = {"rows": rows, "tokens": rows * seq, "shards": shards}
    return {"format_version": FORMAT_VERSION, "fingerprint": inputs.fingerprint, "sequence_length": seq,
            "dtype": token_dtype(bound).name, "vocab_size": bound, "block_rows": block_rows_for(seq, token_dtype(bound)), "tokenizer_fingerprint": tokenizer_fingerprint,
            "units": n_units, "parts": count, "sources": sources, "validation_sources": inputs.val_prints,
            "splits": splits}  # fmt: skip


def _run_part(args: tuple[DataSpec, Any, Inputs, Path, int, int, int, int, int, int]) -> str:
    spec, tokenizer, inputs, out, index, count, shard_rows, encode_workers, unit_bytes, block_bytes = args
    units.UNIT_BYTES, units.BLOCK_BYTES = unit_bytes, block_bytes  # the parent's plan, in a spawned process
    return str(prepare_part(spec, tokenizer, inputs, out, index, count, shard_rows=shard_rows,
                            encode_workers=encode_workers))  # fmt: skip


def prepare_parts(
    spec: DataSpec, tokenizer: Any, inputs: Inputs, out: Path, workers: int, *, shard_rows: int = DEFAULT_SHARD_ROWS
) -> None:
    """Every part of a `workers`-way preparation into `out`: in this process for one worker,
    else in `workers` processes (spawned: never fork a process that may hold torch threads),
    each encoding on its share of the cores."""
    if workers == 1:
        prepare_part(spec, tokenizer, inputs, out, 0, 1, shard_rows=shard_rows)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pretrain.data.encode import usable_cores

    each = max(1, usable_cores() // workers)
    jobs = [(spec, tokenizer, inputs, out, k, workers, shard_rows, each, units.UNIT_BYTES, units.BLOCK_BYTES)
            for k in range(workers)]  # fmt: skip
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_run_part, jobs))
