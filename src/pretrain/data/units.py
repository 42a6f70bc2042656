"""What a preparation reads, cut into units of work that any number of workers can share.

A unit is one input file, or a byte range of a large uncompressed text or JSONL file (every
`UNIT_BYTES`). Units are numbered in source, file and range order, and each is tokenized and
packed on its own (its last partial row dropped), so the prepared dataset is the same whether one
process or a thousand pods made it: worker k of n takes the units u with u % n == k.

A byte range [start, end) holds the lines that begin inside it, as Hadoop's line reader splits
files: a range that does not start the file skips the line in progress at `start` (the range
before it reads that one to its end), and a line beginning before `end` is read whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data.sources import (
    MAX_RECORD_CHARS,
    TEXT_CHUNK_CHARS,
    DataError,
    SourceFile,
    data_format,
    iter_documents,
    reading,
    resolve_files,
    row_text,
    source_fingerprint,
)

#: Bumped whenever the same inputs would prepare to different rows or layout (3: block hashes).
FORMAT_VERSION = 3
#: Bytes of a large splittable file per unit of work (about 16M tokens of English text).
UNIT_BYTES = 64 << 20
#: Bytes of packed rows per block: what a streaming rank fetches and verifies at once, and what
#: the shuffle permutes (order.py). 256 KiB: 128 rows of 1024 uint16 tokens; a step's first read
#: costs about one block per row it reads, so blocks stay small beside a corpus.
BLOCK_BYTES = 256 << 10


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def block_rows_for(seq_len: int, dtype: np.dtype[Any]) -> int:
    """Rows per block: BLOCK_BYTES of rows, at least one."""
    return max(1, BLOCK_BYTES // (seq_len * dtype.itemsize))


def dataset_fingerprint(
    spec: DataSpec, source_prints: list[str], val_prints: list[str], tokenizer_fingerprint: str
) -> str:
    key = {
        "version": FORMAT_VERSION,
        "unit_bytes": UNIT_BYTES,
        "block_bytes": BLOCK_BYTES,
        "sources": source_prints,
        "val_sources": val_prints,
        "tokenizer": tokenizer_fingerprint,
        "sequence_length": spec.sequence_length,
        "validation_split": spec.validation_split if not spec.validation_sources else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Inputs:
    """The files of every source, listed once, and the fingerprint of the dataset they make."""

    files: list[list[SourceFile]]
    val_files: list[list[SourceFile]]
    prints: list[str]
    val_prints: list[str]
    fingerprint: str


def resolve_inputs(spec: DataSpec, tokenizer_fingerprint: str) -> Inputs:
    files = [resolve_files(s) for s in spec.sources]
    val_files = [resolve_files(s) for s in spec.validation_sources]
    prints = [source_fingerprint(s, f) for s, f in zip(spec.sources, files, strict=True)]
    val_prints = [source_fingerprint(s, f) for s, f in zip(spec.validation_sources, val_files, strict=True)]
    return Inputs(
        files, val_files, prints, val_prints, dataset_fingerprint(spec, prints, val_prints, tokenizer_fingerprint)
    )


@dataclass(frozen=True)
class Unit:
    """One unit of work: a file of a source (`source` counts the training sources first, then
    the validation sources), or the byte range [start, end) of it."""

    source: int
    file: SourceFile
    start: int = 0
    end: int | None = None  # None: the whole file, read by its format's own reader


def splittable(src: DataSourceSpec, file: SourceFile) -> bool:
    """Uncompressed line-based files can be read from any byte range."""
    if file.uri.startswith("hf://") or file.uri.lower().endswith((".gz", ".zst", ".bz2", ".xz")):
        return False
    return data_format(src, file.uri) in ("text", "jsonl")


def plan_units(spec: DataSpec, inputs: Inputs) -> list[Unit]:
    units: list[Unit] = []
    unit_bytes = UNIT_BYTES
    all_sources = [*spec.sources, *spec.validation_sources]
    for i, (src, files) in enumerate(zip(all_sources, [*inputs.files, *inputs.val_files], strict=True)):
        for f in files:
            if f.size <= unit_bytes or not splittable(src, f):
                units.append(Unit(i, f))
                continue
            units.extend(Unit(i, f, a, min(a + unit_bytes, f.size)) for a in range(0, f.size, unit_bytes))
    return units


def units_of(count: int, index: int, total: int) -> list[int]:
    """The units worker `index` of `count` prepares."""
    if not 0 <= index < count:
        raise DataError(f"worker index {index} is not in 0..{count - 1}")
    return list(range(index, total, count))


def _lines(uri: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines that begin in [start, end)."""
    import fsspec

    with fsspec.open(uri, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline(MAX_RECORD_CHARS * 4 + 1)  # the line in progress belongs to the range before
        while (pos := f.tell()) < end:
            line = f.readline(MAX_RECORD_CHARS * 4 + 1)
            if not line:
                return
            yield pos, line


def unit_documents(src: DataSourceSpec, unit: Unit) -> Iterator[str]:
    """The documents of a unit: a whole file as its format reads it, or the lines of a range
    (text in chunks of about TEXT_CHUNK_CHARS, one JSON record per line)."""
    if unit.end is None:
        yield from iter_documents(src, unit.file)
        return
    uri, jsonl = unit.file.uri, data_format(src, unit.file.uri) == "jsonl"
    chunk: list[str] = []
    size = 0
    with reading(uri):
        for pos, raw in _lines(uri, unit.start, unit.end):
            line = raw.decode("utf-8")
            if jsonl:
                text = row_text(src, line, f"{uri} at byte {pos}")
                if text:
                    yield text
                continue
            chunk.append(line)
            size += len(line)
            if size >= TEXT_CHUNK_CHARS:
                yield "".join(chunk)
                chunk, size = [], 0
    if chunk:
        yield "".join(chunk)
