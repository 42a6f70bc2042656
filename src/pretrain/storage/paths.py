"""File names that come from outside (object keys in a bucket, entries of a manifest) made safe
to join to a local folder.

Anyone who can write to a bucket can put a key like `model/../../../home/user/.bashrc` there, or a
manifest entry that is an absolute path. Every name read from storage goes through `inside`
before anything is written (or read) at the joined path: it must be a plain relative path whose
every segment is a real name, and the joined path must stay inside the folder even after
symbolic links already there are resolved.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pretrain.errors import UserError


class UnsafePath(UserError, ValueError):
    """A name from storage that would leave its folder; the message says which and why."""


def relative_name(name: str, what: str = "file name") -> PurePosixPath:
    """`name` as a relative POSIX path, or UnsafePath: absolute paths, `..` or `.` segments, empty
    segments, backslashes and NUL are refused (none is produced by anything pretrain writes)."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePath(f"{what} {shown!r}: empty, or has a backslash or NUL")
    if name.startswith("/"):
        raise UnsafePath(f"{what} {shown!r}: an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{what} {shown!r}: has an empty, '.' or '..' segment")
    return PurePosixPath(*parts)


def inside(base: Path, name: str, what: str = "file name") -> Path:
    """`base / name`, refused unless it stays under `base` (symbolic links resolved)."""
    target = base / relative_name(name, what)
    root = base.resolve()
    if not target.resolve().is_relative_to(root):
        raise UnsafePath(f"{what} {name!r}: leads outside {base} through a symbolic link")
    return target


#: Where a corpus never is: the machine's own state. A data source there (`/proc/self/environ`
#: with a bytes tokenizer decodes back to the pod's environment, credentials included) is refused,
#: whatever path or symbolic link leads there.
SYSTEM_PATHS = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc", "/boot")


def system_path(path: str) -> str | None:
    """The system folder `path` lies in (after normalising it), or None."""
    norm = os.path.normpath(path)
    return next((p for p in SYSTEM_PATHS if norm == p or norm.startswith(p + "/")), None)
