"""Tokenize and pack a corpus into fixed-length sequences stored as memory-mappable shards.

Layout of a prepared directory (named by the fingerprint of everything that shapes it)::

    <cache>/<fingerprint>/manifest.json               written last: a directory without it is ignored
    <cache>/<fingerprint>/u000000-train-000000.bin    raw uint16/uint32 tokens, `sequence_length` per row
    <cache>/<fingerprint>/u000000-val-000000.bin

The inputs are cut into units (files, and byte ranges of large files: units.py), each packed on
its own by whichever worker takes it (parts.py): documents are joined with EOS and cut into rows
of exactly `sequence_length` tokens (a unit's last partial row is dropped). Labels and masking are
the collator's business, so one prepared set serves CLM and MLM alike.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data.parts import DEFAULT_SHARD_ROWS, block_digests_name, commit, part_name, prepare_part, prepare_parts
from pretrain.data.sources import DataError, SourceFile, iter_documents, resolve_files
from pretrain.data.units import Inputs, resolve_inputs

log = logging.getLogger("pretrain.data")


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


def prepare(
    spec: DataSpec,
    tokenizer: Any,
    tokenizer_fingerprint: str,
    cache_dir: Path,
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    inputs: Inputs | None = None,
    workers: int = 1,
) -> Path:
    """Prepare (or reuse) the packed dataset for `spec`, in `workers` parts; return its directory."""
    inputs = inputs or resolve_inputs(spec, tokenizer_fingerprint)
    fp = inputs.fingerprint
    target = cache_dir / fp
    if (target / "manifest.json").is_file():
        problem = check_prepared(target)
        if problem is None:
            return target
        log.warning("prepared data %s is damaged (%s): preparing it again", target, problem)
        shutil.rmtree(target)
    work = cache_dir / f".{fp}.partial-{os.getpid()}"
    _remove_dead_partials(cache_dir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        prepare_parts(spec, tokenizer, inputs, work, workers, shard_rows=shard_rows)
        manifest = commit(spec, inputs, work, workers, tokenizer_fingerprint)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a failed preparation leaves nothing behind
        raise
    return _publish_locally(work, target, manifest, workers)


def part_summary(part: dict[str, Any], sequence_length: int) -> dict[str, int]:
    """What a part holds, for the operator's status: units, documents, tokens (train and val)."""
    units = part.get("units") or []
    return {"units": len(units), "documents": sum(int(u.get("documents") or 0) for u in units),
            "tokens": sum(int(u.get("rows") or 0) for u in units) * sequence_length}  # fmt: skip


def parts_folder(cache_dir: Path, fingerprint: str) -> Path:
    """Where `pretrain data prepare --index k --count n` leaves its part for the commit."""
    return cache_dir / f"{fingerprint}.parts"


def commit_parts(spec: DataSpec, inputs: Inputs, cache_dir: Path, count: int, tokenizer_fingerprint: str) -> Path:
    """Join the `count` parts in `parts_folder` into the prepared dataset folder."""
    work = parts_folder(cache_dir, inputs.fingerprint)
    return _publish_locally(work, cache_dir / inputs.fingerprint,
                            commit(spec, inputs, work, count, tokenizer_fingerprint), count)  # fmt: skip


def _publish_locally(work: Path, target: Path, manifest: dict[str, Any], count: int) -> Path:
    """The parts' folder becomes the dataset: part manifests removed, the manifest written last."""
    for k in range(count):
        (work / part_name(k, count)).unlink(missing_ok=True)
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
    workers: int = 1,
) -> Path:
    """Like `prepare`, with an object-storage cache: fetch `<remote>/<fingerprint>` when it is
    complete there, else prepare locally and (when `publish`) upload it, manifest last."""
    if not remote_cache:
        return prepare(spec, tokenizer, tokenizer_fingerprint, local_cache, workers=workers)
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
    path = prepare(spec, tokenizer, tokenizer_fingerprint, local_cache, inputs=inputs, workers=workers)
    if publish:
        upload_dir(path, remote, last="manifest.json")  # shards first: readers wait for the manifest
    return path


def publish_prepared(
    spec: DataSpec, tokenizer: Any, tokenizer_fingerprint: str, scratch: Path, remote_cache: str
) -> str:
    """The URI of the dataset in `remote_cache` (data.cacheUri): there already (a preparation
    Job or an earlier run made it), or prepared here, uploaded with its manifest last, and the
    local copy removed (ranks stream it; no node keeps the corpus)."""
    import fsspec

    from pretrain.storage.fs import upload_dir, with_retries

    inputs = resolve_inputs(spec, tokenizer_fingerprint)
    uri = _dataset_uri(remote_cache, inputs.fingerprint)
    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    if with_retries("read manifest.json", lambda: fs.exists(f"{root}/manifest.json")):
        log.info("dataset %s is prepared: streaming it", uri)
        return uri
    path = prepare(spec, tokenizer, tokenizer_fingerprint, scratch, inputs=inputs)
    upload_dir(path, uri, last="manifest.json")  # shards first: readers wait for the manifest
    shutil.rmtree(path, ignore_errors=True)
    _stamp_path(path).unlink(missing_ok=True)
    log.info("dataset prepared and published to %s: streaming it", uri)
    return uri


def _dataset_uri(remote_cache: str, fingerprint: str) -> str:
    return f"{remote_cache.rstrip('/')}/{fingerprint}"


def prepare_remote_part(
    spec: DataSpec, tokenizer: Any, inputs: Inputs, remote_cache: str, index: int, count: int, scratch: Path
) -> tuple[str, bool, dict[str, Any]]:
    """(where, whether made now, its part manifest): one worker's part of a dataset in object storage: its shards go straight into the
    dataset's folder `<cacheUri>/<fingerprint>/` (no reader trusts that folder before its
    manifest), then its part manifest to `parts/`, last. A part already there is kept."""
    import fsspec

    from pretrain.storage.fs import with_retries

    fs, root = fsspec.core.url_to_fs(_dataset_uri(remote_cache, inputs.fingerprint))
    name = part_name(index, count)
    local = scratch / f".{inputs.fingerprint}.part-{index}-of-{count}-{os.getpid()}"
    if with_retries(f"read parts/{name}", lambda: fs.exists(f"{root}/parts/{name}")):
        local.mkdir(parents=True, exist_ok=True)
        with_retries(f"read parts/{name}", lambda: fs.get_file(f"{root}/parts/{name}", str(local / name)))
        try:
            existing = json.loads((local / name).read_text())
        except ValueError:
            existing = {}  # torn: made again
        if existing.get("fingerprint") == inputs.fingerprint:
            shutil.rmtree(local, ignore_errors=True)
            return f"{root}/parts/{name}", False, existing
    shutil.rmtree(local, ignore_errors=True)
    try:
        path = prepare_part(spec, tokenizer, inputs, local, index, count)
        part: dict[str, Any] = json.loads(path.read_text())
        shards = [name for u in part["units"] for split in ("train", "val")
                  for s in u[split] for name in (s["file"], block_digests_name(s["file"]))]  # fmt: skip
        fs.makedirs(f"{root}/parts", exist_ok=True)  # a local or mounted cacheUri needs its folders
        for shard in shards:
            with_retries(f"upload {shard}", functools.partial(fs.put_file, str(local / shard), f"{root}/{shard}"))
        with_retries(f"upload parts/{name}", lambda: fs.put_file(str(path), f"{root}/parts/{name}"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return f"{root}/parts/{name}", True, part


def commit_remote(
    spec: DataSpec, inputs: Inputs, remote_cache: str, count: int, tokenizer_fingerprint: str, scratch: Path
) -> tuple[str, dict[str, Any]]:
    """Join the `count` parts in `<cacheUri>/<fingerprint>/parts/`: the dataset manifest, last."""
    import fsspec

    from pretrain.storage.fs import with_retries

    uri = _dataset_uri(remote_cache, inputs.fingerprint)
    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()  # the parts other workers wrote, not an earlier listing
    local = scratch / f".{inputs.fingerprint}.commit-{os.getpid()}"
    local.mkdir(parents=True, exist_ok=True)
    try:
        for k in range(count):
            name = part_name(k, count)
            there = f"{root}/parts/{name}"
            if with_retries(f"read parts/{name}", functools.partial(fs.exists, there)):
                with_retries(f"read parts/{name}", functools.partial(fs.get_file, there, str(local / name)))
        try:
            manifest = commit(spec, inputs, local, count, tokenizer_fingerprint)
        except DataError as e:
            raise DataError(str(e).replace(str(local), f"{uri}/parts")) from None
        (local / "manifest.json").write_text(json.dumps(manifest, indent=1))
        with_retries("upload manifest.json", lambda: fs.put_file(str(local / "manifest.json"), f"{root}/manifest.json"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return uri, manifest


def remote_state(remote_cache: str, fingerprint: str, count: int) -> tuple[bool, int]:
    """(whether the dataset is committed, how many of the `count` parts are there): one listing."""
    import fsspec

    from pretrain.storage.fs import with_retries

    fs, root = fsspec.core.url_to_fs(_dataset_uri(remote_cache, fingerprint))
    fs.invalidate_cache()  # other workers wrote since this process last listed: no stale listing
    committed = bool(with_retries("read manifest.json", lambda: fs.exists(f"{root}/manifest.json")))
    try:
        listed = with_retries("list parts/", lambda: fs.ls(f"{root}/parts", detail=False))
    except FileNotFoundError:
        listed = []
    names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed}
    return committed, sum(1 for k in range(count) if part_name(k, count) in names)
