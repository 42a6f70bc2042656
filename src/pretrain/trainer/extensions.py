"""DeepSpeed's compiled CPU op, built into the trainer image and copied where DeepSpeed looks.

On CPU, `deepspeed.init_distributed` JIT-compiles its shared-memory communication op into
TORCH_EXTENSIONS_DIR at every launch that finds no build there: about 30 s and over a GB of
memory per pod, in every fresh pod, since that folder lies on the pod's emptyDir. The CPU
trainer image compiles it once at build time under PRETRAIN_PREBUILT_EXTENSIONS; copying that
build (with its timestamps, so that ninja finds it up to date) into an empty TORCH_EXTENSIONS_DIR
makes the launch load it instead. The build folder must stay writable (torch takes a lock file
and rewrites build.ninja there), which is why it is copied rather than pointed at.

Only what looks like a torch extension build is copied (a folder with `build.ninja` and a
compiled `.so`), and never a folder that holds the cache itself: an unset variable once meant
"the working directory", and `make demo` copied the whole project, `.git` and `.venv` included,
into `.cache/torch_extensions` (then that cache into itself on the next launch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("pretrain.trainer")

PREBUILT_ENV = "PRETRAIN_PREBUILT_EXTENSIONS"


def is_extension_build(folder: Path) -> bool:
    """True for a folder torch's cpp_extension.load built: its build.ninja beside a shared object."""
    try:
        return (folder / "build.ninja").is_file() and any(p.suffix == ".so" for p in folder.iterdir())
    except OSError:
        return False


def prebuilt_extensions(source: Path, dest: Path) -> list[Path]:
    """The extension builds under `source` that may be copied into `dest`: never `dest` itself,
    a folder holding it, or a folder inside it."""
    if not source.is_dir():
        return []
    dest = dest.resolve()
    found = []
    for built in sorted(p for p in source.iterdir() if p.is_dir() and not p.is_symlink()):
        real = built.resolve()
        if real == dest or dest.is_relative_to(real) or real.is_relative_to(dest):
            continue
        if is_extension_build(built):
            found.append(built)
    return found


def seed_extension_cache(prebuilt: str | None = None, target: str | None = None) -> list[str]:
    """Copy each prebuilt extension missing from the cache; returns the names copied. Nothing
    when no prebuilt folder is named. Safe when several local ranks do it at once (each copies
    to a folder of its own, then renames)."""
    named = prebuilt or os.environ.get(PREBUILT_ENV, "")
    dest = target or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not dest or not named.strip():
        return []
    copied = []
    for built in prebuilt_extensions(Path(named), Path(dest)):
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


#: An flock beside the builds: every trainer builds (or loads) DeepSpeed's CPU op while holding it.
BUILD_LOCK = ".pretrain-build.lock"


def _load_shm_op() -> None:
    """What deepspeed.init_distributed does first on CPU (comm/torch.py: build_shm_op)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)


def build_cpu_op(cache: str | None = None, load: Callable[[], None] = _load_shm_op) -> list[Path]:
    """Build (or load) DeepSpeed's CPU op before deepspeed.init_distributed does, under an flock
    in the cache; the stale torch lock files removed (returned).

    torch guards a JIT build with a `lock` file that only its builder removes: a trainer killed
    mid-build (a pod deleted in its first minute) leaves it, and every later launch on that cache
    waits on it forever (a CI run hung so). An flock dies with its holder, so whoever holds this
    one knows that a torch lock it finds belongs to no build still running (every build runs
    under the flock; DeepSpeed's own load in init_distributed, after this, finds the op built and
    takes torch's lock for a moment only). Not inside init_distributed: that joins the
    rendezvous, and a rank holding the flock there would wait for one waiting on the flock."""
    import fcntl

    dest = cache or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not dest:
        load()
        return []
    Path(dest).mkdir(parents=True, exist_ok=True)
    with open(Path(dest) / BUILD_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = sorted(p for p in Path(dest).glob("*/lock") if p.is_file())
        for lock in stale:
            lock.unlink(missing_ok=True)
            log.warning("removed %s: a build killed before it finished left it, and every later launch "
                        "would have waited on it forever", lock)  # fmt: skip
        load()
    return stale
