"""DeepSpeed's compiled CPU op, built into the trainer image and copied where DeepSpeed looks.

On CPU, `deepspeed.init_distributed` JIT-compiles its shared-memory communication op into
TORCH_EXTENSIONS_DIR at every launch that finds no build there: about 30 s and over a GB of
memory per pod, in every fresh pod, since that folder lies on the pod's emptyDir. The CPU
trainer image compiles it once at build time under PRETRAIN_PREBUILT_EXTENSIONS; copying that
build (with its timestamps, so that ninja finds it up to date) into an empty TORCH_EXTENSIONS_DIR
makes the launch load it instead. The build folder must stay writable (torch takes a lock file
and rewrites build.ninja there), which is why it is copied rather than pointed at.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("pretrain.trainer")


def seed_extension_cache(prebuilt: str | None = None, target: str | None = None) -> list[str]:
    """Copy each prebuilt extension missing from the cache; returns the names copied. Safe when
    several local ranks do it at once (each copies to a folder of its own, then renames)."""
    source = Path(prebuilt or os.environ.get("PRETRAIN_PREBUILT_EXTENSIONS", ""))
    dest = target or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not dest or not str(source) or not source.is_dir():
        return []
    copied = []
    for built in sorted(p for p in source.iterdir() if p.is_dir()):
        final = Path(dest) / built.name
        if final.exists():
            continue
        partial = Path(dest) / f".{built.name}.partial-{os.getpid()}"
        try:
            shutil.copytree(built, partial, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("lock"))
            os.rename(partial, final)
            copied.append(built.name)
        except OSError as e:  # another rank got there first, or the cache is not writable: DeepSpeed compiles
            log.debug("prebuilt extension %s not copied: %s", built.name, e)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(partial)
    return copied
