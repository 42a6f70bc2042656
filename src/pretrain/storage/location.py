"""A checkpoint location: the fsspec plumbing every part of the store shares, and the reading.

`Location` is the URI with its filesystem, retries that turn a persisting transient error into a
`CheckpointError` that says so, small writes (plain and exclusive), listings that never come from
a stale cache, and what is known of a folder's manifest (complete, absent, damaged). It holds no
policy: the saving (`publish.py`), the choices of what to keep and resume (`retention.py`) and the
store that runs them (`checkpoint.py`) are built on it. The uploader's child process builds one
from `LocationArgs`, which pickle.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.storage.fs import StorageError, is_local, is_transient, local_path, with_retries
from pretrain.storage.manifest import MANIFEST, STEP_DIR, Manifest, parse_manifest


class CheckpointError(StorageError):
    """A checkpoint that cannot be saved or loaded; the message says which and why."""


@dataclass(frozen=True)
class LocationArgs:
    """What names a location and how hard to retry it: enough to open it again in another process."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    retry_attempts: int = 8
    retry_base_delay: float = 0.5


class Location:
    def __init__(self, args: LocationArgs) -> None:
        self.args = args
        self.local = is_local(args.uri)
        self.uri = str(local_path(args.uri).resolve()) if self.local else args.uri.rstrip("/")
        self.options = args.storage_options
        self._fs: Any = None
        self._root = ""

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.uri, **self.options)
        return self._fs

    @property
    def root(self) -> str:
        _ = self.fs
        return str(self._root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn` with transient errors retried; one that persists becomes a CheckpointError that
        says so (other errors, FileNotFoundError among them, pass unchanged)."""
        attempts = self.args.retry_attempts
        try:
            return with_retries(what, fn, attempts=attempts, base_delay=self.args.retry_base_delay)
        except Exception as e:
            if not is_transient(e):
                raise
            raise CheckpointError(f"{what} in {self.uri} failed {attempts} times ({e.__class__.__name__}: {e})") from e

    def pipe(self, what: str, path: str, data: bytes) -> None:
        """Write a small object (parents created on local stores, where they matter)."""

        def put() -> None:
            if self.local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, data)

        self.retry(what, put)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Write a small object only where none is (FileExistsError otherwise), whole or not at
        all: link() of a finished file on a local disk, a conditional put (If-None-Match) on S3."""
        if self.local:
            # Written whole under a name of its own, then linked into place: link() fails when the
            # name exists, and no reader ever sees the file empty or half-written.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        self.fs.pipe_file(path, data, mode="create")  # s3fs: If-None-Match, a 412 as FileExistsError

    def ls(self, path: str) -> list[str]:
        """The names in `path` (none when it is absent), never from a cached listing."""
        self.fs.invalidate_cache(path)  # s3fs caches listings; other nodes write here too
        try:
            return [Path(p).name for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.join(rel)))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.retry("delete", functools.partial(self.fs.rm, self.join(rel), recursive=True))

    def steps(self) -> list[int]:
        """Steps that have a directory (complete or not), ascending."""
        self.fs.invalidate_cache()
        names = self.retry("list steps", functools.partial(self.ls, self.root))
        return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)

    def manifest_state(self, rel: str) -> tuple[str, Manifest | None, str]:
        """What is known of `<uri>/<rel>/manifest.json`: ("complete", manifest, ""), ("absent",
        None, "") on a NotFound, or ("damaged", None, why) when it is there but is no manifest.
        Any other failure (throttling, 5xx, timeouts, a refused read), once retries are spent,
        raises CheckpointError: nothing may be decided, let alone deleted, on a failed read."""
        try:
            data = self.retry(f"read {rel}/{MANIFEST}", functools.partial(self.fs.cat_file, self.join(rel, MANIFEST)))
        except FileNotFoundError:
            return "absent", None, ""
        except CheckpointError as e:
            raise CheckpointError(f"{e}: nothing was deleted or loaded; run again once the storage answers") from None
        except Exception as e:
            raise CheckpointError(
                f"cannot read {self.uri}/{rel}/{MANIFEST} ({e.__class__.__name__}: {e}): nothing was deleted or loaded"
            ) from None
        try:
            manifest = parse_manifest(json.loads(data))
        except ValueError as e:  # not UTF-8, not JSON
            return "damaged", None, f"{MANIFEST} does not parse ({e.__class__.__name__}: {e})"
        if manifest is None:
            return "damaged", None, f"{MANIFEST} is not a manifest (fields missing or of the wrong type)"
        return "complete", manifest, ""
