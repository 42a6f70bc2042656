"""The checkpoint folder's contract, named once: folder names and the manifest's fields.

Written by the store (`checkpoint.py`), read by the trainer (which world size and ZeRO stage
wrote a step), `pretrain checkpoints`, `pretrain report` and the operator (the step name in
status). Readers get a `Manifest` only when its shape is right (`parse_manifest`), so none of
them indexes raw JSON. Dependency-free: the operator image imports it.
"""

from __future__ import annotations

import re
from typing import Any, NotRequired, TypedDict

MANIFEST = "manifest.json"
#: Per-node lists of files, merged into the manifest by the writer (global rank 0).
PARTS = ".parts"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


class FileEntry(TypedDict):
    size: int
    sha256: str


class Manifest(TypedDict):
    """A published folder's manifest: a step (`commit`) or a folder derived from one
    (`publish_folder`: the universal form, with `from_*` and `convert_seconds`)."""

    files: dict[str, FileEntry]
    time: NotRequired[str]
    step: NotRequired[int]
    world_size: NotRequired[int]
    zero_stage: NotRequired[int]
    job: NotRequired[str]
    from_world_size: NotRequired[int | None]
    from_zero_stage: NotRequired[int | None]
    convert_seconds: NotRequired[float]


def parse_manifest(raw: Any) -> Manifest | None:
    """`raw` (parsed JSON) as a Manifest, or None when it is not one: files must map names to
    an integer size and a sha256 hex digest, and the known numbers must be numbers."""
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
        return None
    for entry in raw["files"].values():
        if not (isinstance(entry, dict) and _is_int(entry.get("size")) and isinstance(entry.get("sha256"), str)):
            return None
    for key in ("step", "world_size", "zero_stage"):
        if key in raw and not _is_int(raw[key]):
            return None
    manifest: Manifest = raw  # type: ignore[assignment]  # checked above
    return manifest


def total_bytes(manifest: Manifest) -> int:
    return sum(f["size"] for f in manifest["files"].values())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
