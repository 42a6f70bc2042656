"""Saving one checkpoint: each node hashes (and uploads) its files and publishes its part; the
manifest writer (global rank 0) waits for every node's part and writes the manifest, last.

Functions over a `Location`, called in the trainer's process or in its uploader child
(`uploader.py`), which imports this module and not the store.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain.storage.fs import local_path, sha256_file
from pretrain.storage.location import CheckpointError, Location
from pretrain.storage.manifest import MANIFEST, PARTS, step_name

#: Files uploaded at once, and the part size of multipart uploads.
UPLOAD_THREADS = 2
UPLOAD_BLOCK = 64 * 2**20


def background_priority() -> None:
    """Lower this thread's CPU priority (Linux threads have their own nice value): checkpoint
    hashing and uploading must not slow the training loop on a busy host."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def files_under(root: Path) -> Iterator[Path]:
    """The files of a checkpoint folder, in a stable order: the parts and the manifest aside."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and PARTS not in p.relative_to(root).parts and p.name != MANIFEST:
            yield p


def staging_dir(loc: Location, workdir: Path, step: int) -> Path:
    """Where this node's ranks write checkpoint `step` (the final place for local URIs)."""
    if loc.local:
        return local_path(loc.uri) / step_name(step)
    return workdir / "staging" / step_name(step)


def publish_part(loc: Location, staging: Path, step: int, node_rank: int) -> int:
    """Hash (and, for remote stores, upload) this node's files, reading each once, several
    files at a time; then publish the node's part listing them. Returns the bytes."""
    paths = list(files_under(staging))
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="ckpt-file") as pool:
        digests = list(pool.map(lambda p: _publish_file(loc, step, staging, p), paths))
    files = {rel: {"size": size, "sha256": digest} for rel, size, digest in digests}
    part = json.dumps({"node": node_rank, "files": files}).encode()
    loc.pipe("write part", loc.join(step_name(step), PARTS, f"node-{node_rank}.json"), part)
    if not loc.local:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(size for _, size, _ in digests)


def _publish_file(loc: Location, step: int, staging: Path, path: Path) -> tuple[str, int, str]:
    background_priority()
    rel = path.relative_to(staging).as_posix()
    if loc.local:
        return rel, path.stat().st_size, sha256_file(path)
    target = loc.join(step_name(step), rel)

    def upload() -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as src, loc.fs.open(target, "wb", block_size=UPLOAD_BLOCK) as dst:
            for block in iter(lambda: src.read(UPLOAD_BLOCK), b""):
                h.update(block)
                dst.write(block)
                size += len(block)
        return size, h.hexdigest()

    size, digest = loc.retry(f"upload {rel}", upload)
    return rel, size, digest


def write_manifest(loc: Location, step: int, nodes: int, part_timeout: float, meta: dict[str, Any]) -> None:
    """Wait (up to `part_timeout`) for every node's part, then write the manifest of all their
    files: the commit of the step."""
    deadline = time.monotonic() + part_timeout
    parts_dir = loc.join(step_name(step), PARTS)
    while True:
        names = [n for n in loc.retry("list parts", functools.partial(loc.ls, parts_dir)) if n.endswith(".json")]
        if len(names) >= nodes:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{step_name(step)}: only {len(names)} of {nodes} nodes finished uploading")
        time.sleep(0.5)
    files: dict[str, Any] = {}
    for name in names:
        part = json.loads(loc.retry("read part", functools.partial(loc.fs.cat_file, f"{parts_dir}/{name}")))
        files.update(part["files"])
    manifest = {"step": step, "time": datetime.now(UTC).isoformat(timespec="seconds"), "files": files, **meta}
    loc.pipe("write manifest", loc.join(step_name(step), MANIFEST), json.dumps(manifest, indent=1).encode())
