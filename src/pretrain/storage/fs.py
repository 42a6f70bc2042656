"""Object-store plumbing shared by checkpoints, the data cache, exports and the run history:
what a URI names (local or remote), retries of transient errors, whole-directory transfer, and
whether a failed write ran out of disk. No torch, no DeepSpeed; fsspec is imported on first use."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.storage.paths import UnsafePath, inside

log = logging.getLogger("pretrain.storage")


class StorageError(UserError, RuntimeError):
    """A transfer that cannot be done; the message says which and why."""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_TRANSIENT_WORDS = ("Connection", "Timeout", "Throttl", "SlowDown", "ServiceUnavailable", "InternalError", "Retry")


def is_transient(e: BaseException) -> bool:
    """Errors worth retrying: network and server-side trouble, whatever client library raised it
    (OSError for fsspec's own, botocore/aiohttp/google classes by name)."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
        return False  # a full disk does not empty itself between retries
    if isinstance(e, OSError | TimeoutError | ConnectionError):
        return True
    return any(word in cls.__name__ for cls in type(e).__mro__ for word in _TRANSIENT_WORDS)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def out_of_space(where: Path) -> str | None:
    """Say so when the failure `e` of a write under `where` is a full disk: the disk holding it is
    left with almost nothing free (under 64 MiB and under 5% of its size). Judged by the disk,
    not by the error, since torch's writer reports a full disk as "unexpected pos 161856 vs
    161744", and an ENOSPC does not say which of a run's disks it came from."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    if usage.free >= min(64 << 20, usage.total // 20):
        return None  # an ENOSPC from this error came from another disk, or it was something else
    return f"no space left on the disk holding {where} ({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB)"


@dataclass(frozen=True)
class Retrying:
    """A storage call being retried: what, its last error, and since when (unix time)."""

    what: str
    error: str
    since: float


_retrying: dict[int, Retrying] = {}  # by thread: several may retry at once
_retrying_lock = threading.Lock()


def storage_retrying() -> Retrying | None:
    """The longest-running storage call now being retried in this process, if any: served as a
    metric, so the operator can say a job is waiting on its storage rather than training."""
    with _retrying_lock:
        return min(_retrying.values(), key=lambda r: r.since, default=None)


def _note_retry(what: str, e: BaseException | None) -> None:
    key = threading.get_ident()
    with _retrying_lock:
        if e is None:
            _retrying.pop(key, None)
        else:
            since = _retrying[key].since if key in _retrying else time.time()
            _retrying[key] = Retrying(what, f"{type(e).__name__}: {e}"[:300], since)


def with_retries(
    what: str, fn: Callable[[], Any], *, attempts: int = 8, base_delay: float = 0.5, max_delay: float = 30.0
) -> Any:
    """Call `fn`, retrying transient errors with capped exponential backoff (`storage_retrying`
    says so meanwhile)."""
    delay = base_delay
    try:
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt == attempts or not is_transient(e):
                    raise
                _note_retry(what, e)
                log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, e.__class__.__name__, e, attempt,
                            attempts - 1, delay)  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, max_delay)
    finally:
        _note_retry(what, None)
    raise AssertionError("unreachable")


def download_dir(uri: str, dest: Path, storage_options: dict[str, Any] | None = None, *, into: bool = False) -> Path:
    """A local copy of a directory URI. A local URI is returned as is, unless `into` asks for a
    copy at `dest` anyway."""
    if is_local(uri) and not into:
        return local_path(uri)
    if is_local(uri):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(local_path(uri), dest)
        return dest
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    files = fs.find(root)
    if not files:
        raise StorageError(f"{uri}: nothing there to download")
    dest.mkdir(parents=True, exist_ok=True)
    prefix = root.rstrip("/") + "/"
    for path in files:
        if not path.startswith(prefix):
            raise StorageError(f"{uri}: the store listed {path!r}, which is not under it")
        rel = path[len(prefix) :]
        try:
            target = inside(dest, rel, f"{uri}: object key")
        except UnsafePath as e:
            raise StorageError(str(e)) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(f"download {rel}", functools.partial(fs.get_file, path, str(target)))
    return dest


def upload_dir(
    local_dir: Path, uri: str, storage_options: dict[str, Any] | None = None, *, last: str | None = None,
    before_last: Callable[[], None] | None = None, retry: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> None:  # fmt: skip
    """Copy a local directory's files to a directory URI (local or object storage).

    The one "manifest last" publish of the project (checkpoint folders, the data cache): `last`
    names the file copied after all the others, a manifest whose presence tells readers the
    rest is there, and `before_last` runs just before it goes (a lease check: a run that lost
    its lease publishes nothing). `retry(what, fn)` wraps each copy (default: with_retries).
    """
    retry = retry or with_retries
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if last is not None:
        files = [p for p in files if p.relative_to(local_dir).as_posix() != last] + [
            p for p in files if p.relative_to(local_dir).as_posix() == last
        ]
    if is_local(uri):
        dest = local_path(uri)
        if dest.resolve() == local_dir.resolve():
            return
        shutil.rmtree(dest, ignore_errors=True)
        copy: Callable[[Path, str], Any] = functools.partial(_copy_local, dest=dest)
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        copy = lambda p, rel: fs.put_file(str(p), f"{root}/{rel}")  # noqa: E731
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        if rel == last and before_last is not None:
            before_last()
        retry(f"upload {rel}", functools.partial(copy, p, rel))


def _copy_local(path: Path, rel: str, *, dest: Path) -> None:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
