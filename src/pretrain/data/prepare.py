"""Tokenize and pack a corpus into fixed-length sequences stored as memory-mappable shards.

Layout of a prepared directory (named by the fingerprint of everything that shapes it)::

    <cache>/<fingerprint>/manifest.json      written last: a directory without it is ignored
    <cache>/<fingerprint>/train-000000.bin    raw uint16/uint32 tokens, `sequence_length` per row
    <cache>/<fingerprint>/val-000000.bin

Documents are joined with EOS and cut into rows of exactly `sequence_length` tokens (the last
partial row of a source is dropped). Labels and masking are the collator's business, so one
prepared set serves CLM and MLM alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data.encode import BatchEncoder
from pretrain.data.sources import DataError, SourceFile, iter_documents, resolve_files, source_fingerprint
from pretrain.data.tokenizer import id_bound

log = logging.getLogger("pretrain.data")

FORMAT_VERSION = 1
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


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def dataset_fingerprint(
    spec: DataSpec, source_prints: list[str], val_prints: list[str], tokenizer_fingerprint: str
) -> str:
    key = {
        "version": FORMAT_VERSION,
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


def iter_all_documents(src: DataSourceSpec, files: list[SourceFile]) -> Iterator[str]:
    for f in files:
        yield from iter_documents(src, f)


def text_sample(spec: DataSpec, max_bytes: int) -> Iterator[str]:
    """Up to `max_bytes` of text from the sources, in order: what chars/bpe tokenizers learn from."""
    seen = 0
    for src in spec.sources:
        for doc in iter_all_documents(src, resolve_files(src)):
            yield doc[: max_bytes - seen]
            seen += len(doc)
            if seen >= max_bytes:
                return


class _ShardWriter:
    """Appends rows to numbered shard files of one split, hashing as it goes."""

    def __init__(
        self, directory: Path, split: str, dtype: np.dtype[Any], seq_len: int, shard_rows: int, id_bound: int
    ) -> None:
        self.directory, self.split, self.dtype, self.seq_len = directory, split, dtype, seq_len
        self.shard_rows, self.id_bound = shard_rows, id_bound
        self.shards: list[Shard] = []
        self._fh: Any = None
        self._hash: Any = None
        self._rows = 0
        self._source = -1
        self._name = ""

    def _open(self, source: int) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.bin"
        self._fh = open(self.directory / self._name, "wb")  # noqa: SIM115 - closed in _close
        self._hash = hashlib.sha256()
        self._rows = 0
        self._source = source

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards.append(Shard(self._name, self._rows, self._source, self._hash.hexdigest()))
            self._fh = None

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
            data = block.tobytes()
            self._fh.write(data)
            self._hash.update(data)
            self._rows += take
            start += take

    def close(self) -> list[Shard]:
        self._close()
        return self.shards


def _batches(src: DataSourceSpec, files: list[SourceFile], counter: list[int]) -> Iterator[list[str]]:
    """Non-empty documents in batches of ENCODE_BATCH documents or ENCODE_CHARS characters;
    counter[0] counts the documents."""
    batch: list[str] = []
    chars = 0
    for doc in iter_all_documents(src, files):
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


def _pack_source(
    src: DataSourceSpec, files: list[SourceFile], encoder: BatchEncoder, seq_len: int, tmp: Path, dtype: np.dtype[Any]
) -> tuple[Path, int, int]:
    """Tokenize one source into a flat file of rows; returns (file, rows, documents)."""
    out = tmp / f"rows-{source_fingerprint(src, files)}.bin"
    carry = np.zeros(0, dtype=dtype)
    rows = 0
    docs = [0]
    with open(out, "wb") as fh:
        for flat in encoder.map(_batches(src, files, docs)):
            stream = np.concatenate([carry, flat]) if len(carry) else flat
            n = len(stream) // seq_len
            if n:
                fh.write(stream[: n * seq_len].tobytes())
                rows += n
            carry = stream[n * seq_len :].copy()
    return out, rows, docs[0]


def _pack_sources(
    spec: DataSpec, inputs: Inputs, encoder: BatchEncoder, work: Path, train: _ShardWriter, val: _ShardWriter
) -> list[dict[str, Any]]:
    """Pack every source into the train/val shard writers; return the manifest's source entries."""
    seq, dtype = spec.sequence_length, train.dtype
    source_entries = []
    for i, (src, fs) in enumerate(zip(spec.sources, inputs.files, strict=True)):
        flat, rows, docs = _pack_source(src, fs, encoder, seq, work, dtype)
        if rows == 0:
            raise DataError(f"{src.uri}: too little text for one sequence of {seq} tokens ({docs} documents)")
        data = np.memmap(flat, dtype=dtype, mode="r", shape=(rows, seq))
        n_val = 0 if spec.validation_sources else math.ceil(rows * spec.validation_split)
        if n_val and rows - n_val < 1:
            raise DataError(f"{src.uri}: {rows} sequences leave none for training after the validation split")
        train.write(data[: rows - n_val], i)
        if n_val:
            val.write(data[rows - n_val :], i)
        del data
        flat.unlink()
        source_entries.append(
            {"uri": src.uri, "fingerprint": inputs.prints[i], "weight": src.weight, "documents": docs,
             "files": [f.uri for f in fs], "rows": rows, "val_rows": n_val}
        )  # fmt: skip
    for j, (src, fs) in enumerate(zip(spec.validation_sources, inputs.val_files, strict=True)):
        flat, rows, _ = _pack_source(src, fs, encoder, seq, work, dtype)
        if rows == 0:
            raise DataError(f"{src.uri}: too little text for one validation sequence of {seq} tokens")
        data = np.memmap(flat, dtype=dtype, mode="r", shape=(rows, seq))
        val.write(data, len(spec.sources) + j)
        del data
        flat.unlink()
    return source_entries


def prepare(
    spec: DataSpec,
    tokenizer: Any,
    tokenizer_fingerprint: str,
    cache_dir: Path,
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    inputs: Inputs | None = None,
) -> Path:
    """Prepare (or reuse) the packed dataset for `spec`; return its directory."""
    inputs = inputs or resolve_inputs(spec, tokenizer_fingerprint)
    fp = inputs.fingerprint
    target = cache_dir / fp
    if (target / "manifest.json").is_file():
        problem = check_prepared(target)
        if problem is None:
            return target
        log.warning("prepared data %s is damaged (%s): preparing it again", target, problem)
        shutil.rmtree(target)
    vocab = id_bound(tokenizer)
    dtype = token_dtype(vocab)
    seq = spec.sequence_length
    work = cache_dir / f".{fp}.partial-{os.getpid()}"
    _remove_dead_partials(cache_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        train = _ShardWriter(work, "train", dtype, seq, shard_rows, vocab)
        val = _ShardWriter(work, "val", dtype, seq, shard_rows, vocab)
        with BatchEncoder(tokenizer, dtype) as encoder:
            source_entries = _pack_sources(spec, inputs, encoder, work, train, val)
        train_shards, val_shards = train.close(), val.close()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a failed preparation leaves nothing behind
        raise
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "sequence_length": seq,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "sources": source_entries,
        "validation_sources": inputs.val_prints,
        "splits": {
            name: {
                "rows": sum(s.rows for s in shards),
                "tokens": sum(s.rows for s in shards) * seq,
                "shards": [s.__dict__ for s in shards],
            }
            for name, shards in (("train", train_shards), ("val", val_shards))
        },
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if target.exists():  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
        return target
    work.rename(target)
    _stamp(target)  # just written and hashed: the next start need not hash it again
    return target


def _stamp_path(target: Path) -> Path:
    return target.parent / f".{target.name}.verified.json"


def _file_stamps(target: Path, names: list[str]) -> dict[str, list[int]]:
    return {n: [(st := (target / n).stat()).st_size, st.st_mtime_ns] for n in names}


def _stamp(target: Path) -> None:
    """Record each shard's size and modification time once its checksum is known good."""
    names = [s["file"] for split in _read_manifest(target)["splits"].values() for s in split["shards"]]
    tmp = _stamp_path(target).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_file_stamps(target, names)))
    os.replace(tmp, _stamp_path(target))  # local ranks check at once: none reads it half-written


def _known_stamps(target: Path) -> dict[str, Any]:
    try:
        known = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return {}  # no record: every shard is hashed
    return known if isinstance(known, dict) else {}


def _read_manifest(target: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((target / "manifest.json").read_text())
        return manifest
    except (OSError, ValueError) as e:
        raise DataError(f"{target}/manifest.json: unreadable dataset manifest ({e.__class__.__name__})") from None


def check_prepared(target: Path) -> str | None:
    """What is wrong with a prepared folder, or None: every shard of its manifest must be
    there, of its size, with its sha256. A shard whose size and modification time match the
    last check is not hashed again (a rewrite, even at the same size, changes the time)."""
    from pretrain.storage.paths import UnsafePath, inside

    try:
        manifest = _read_manifest(target)
        seq, itemsize = int(manifest["sequence_length"]), np.dtype(manifest["dtype"]).itemsize
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        known = _known_stamps(target)
    except (DataError, KeyError, TypeError, ValueError) as e:
        return f"its manifest is unreadable ({e.__class__.__name__}: {e})"
    for s in shards:
        try:
            path = inside(target, str(s["file"]), "dataset manifest: shard")
        except UnsafePath as e:
            return str(e)
        expected = int(s["rows"]) * seq * itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            return f"shard {s['file']} is {'missing' if size < 0 else f'{size} bytes, expected {expected}'}"
        if known.get(s["file"]) == _file_stamps(target, [s["file"]])[s["file"]]:
            continue
        from pretrain.storage.fs import sha256_file

        if sha256_file(path) != s["sha256"]:
            return f"shard {s['file']} fails its sha256 check"
    _stamp(target)
    return None


def _remove_dead_partials(cache_dir: Path) -> None:
    """Remove `.<fp>.partial-<pid>` folders whose process is gone (killed mid-preparation)."""
    if not cache_dir.is_dir():
        return
    for partial in cache_dir.glob(".*.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def prepare_cached(
    spec: DataSpec,
    tokenizer: Any,
    tokenizer_fingerprint: str,
    local_cache: Path,
    remote_cache: str | None,
    *,
    publish: bool,
) -> Path:
    """Like `prepare`, with an object-storage cache: fetch `<remote>/<fingerprint>` when it is
    complete there, else prepare locally and (when `publish`) upload it, manifest last."""
    if not remote_cache:
        return prepare(spec, tokenizer, tokenizer_fingerprint, local_cache)
    import fsspec

    from pretrain.storage.fs import download_dir, upload_dir

    inputs = resolve_inputs(spec, tokenizer_fingerprint)
    fp = inputs.fingerprint
    target = local_cache / fp
    if (target / "manifest.json").is_file() and check_prepared(target) is None:
        return target
    remote = f"{remote_cache.rstrip('/')}/{fp}"
    fs, root = fsspec.core.url_to_fs(remote)
    if fs.exists(f"{root}/manifest.json"):
        staging = local_cache / f".{fp}.download-{os.getpid()}"
        download_dir(remote, staging, into=True)
        problem = check_prepared(staging)
        if problem is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"data.cacheUri {remote}: {problem}; never trained on: delete {remote} to prepare it again")
        _stamp_path(staging).rename(_stamp_path(target))
        shutil.rmtree(target, ignore_errors=True)  # a damaged local copy, found above
        staging.rename(target)
        return target
    path = prepare(spec, tokenizer, tokenizer_fingerprint, local_cache, inputs=inputs)
    if publish:
        upload_dir(path, remote, last="manifest.json")  # shards first: readers wait for the manifest
    return path
