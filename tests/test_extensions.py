"""The extension cache receives prebuilt torch extensions and nothing else (issue 33, item 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pretrain.trainer.extensions import PREBUILT_ENV, is_extension_build, seed_extension_cache


def fake_build(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("rule cxx\n")
    (folder / f"{folder.name}.so").write_bytes(b"\x7fELF")
    return folder


def test_unset_variable_copies_nothing_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix an unset PRETRAIN_PREBUILT_EXTENSIONS meant `.`: every folder of the
    working directory (a project's .git, .venv, runs) was copied into the cache."""
    project = tmp_path / "project"
    (project / "canary").mkdir(parents=True)
    (project / "canary" / "weights.bin").write_bytes(b"x" * 100)
    cache = project / ".cache" / "torch_extensions"
    cache.mkdir(parents=True)
    monkeypatch.chdir(project)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    for value in (None, "", "  "):
        if value is None:
            monkeypatch.delenv(PREBUILT_ENV, raising=False)
        else:
            monkeypatch.setenv(PREBUILT_ENV, value)
        assert seed_extension_cache() == []
        assert os.listdir(cache) == []


def test_only_extension_builds_are_copied_and_never_the_cache_into_itself(tmp_path: Path) -> None:
    source = tmp_path / "prebuilt"
    fake_build(source / "deepspeed_shm_comm")
    (source / "notes").mkdir(parents=True)  # not a build: no build.ninja, no .so
    (source / "notes" / "build.ninja").write_text("")  # half a build is not one
    cache = source / "cache"  # the cache lies inside the prebuilt folder
    fake_build(cache / "already_there")
    copied = seed_extension_cache(str(source), str(cache))
    assert copied == ["deepspeed_shm_comm"]
    assert sorted(os.listdir(cache)) == ["already_there", "deepspeed_shm_comm"]
    assert is_extension_build(cache / "deepspeed_shm_comm")
    # A cache that holds the prebuilt folder is not copied into either.
    outer = tmp_path / "outer"
    fake_build(outer / "ext" / "inner_ext")
    assert seed_extension_cache(str(outer), str(outer / "ext")) == []
    # Run again: nothing more to copy.
    assert seed_extension_cache(str(source), str(cache)) == []


def test_a_build_killed_midway_no_longer_hangs_every_later_launch(tmp_path: Path) -> None:
    """torch's JIT build takes a `lock` file (its FileBaton) that only the builder removes; a
    trainer killed mid-build left it in a CI run, and every later trainer waited on it forever.
    build_cpu_op holds an flock while it builds, so a torch lock it finds is stale: removed, said,
    and torch's own baton is then free for the build."""
    from torch.utils.file_baton import FileBaton

    from pretrain.trainer.extensions import build_cpu_op

    cache = tmp_path / "ext"
    (cache / "deepspeed_shm_comm").mkdir(parents=True)
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()
    assert not FileBaton(str(lock)).try_acquire(), "as torch finds it: it would wait forever"
    took: list[bool] = []
    removed = build_cpu_op(str(cache), load=lambda: took.append(FileBaton(str(lock)).try_acquire()))
    assert removed == [lock] and took == [True]
    assert (cache / ".pretrain-build.lock").exists()


def test_builds_take_turns(tmp_path: Path) -> None:
    """Two processes building at once: the second loads only once the first has finished."""
    import subprocess
    import sys

    script = (
        "import sys, time\nfrom pretrain.trainer.extensions import build_cpu_op\n"
        "def load():\n    print('start', time.monotonic(), flush=True)\n    time.sleep(1.0)\n"
        "    print('end', time.monotonic(), flush=True)\n"
        "build_cpu_op(sys.argv[1], load=load)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        marks = dict(line.split() for line in out.splitlines())
        spans.append((float(marks["start"]), float(marks["end"])))
    first, second = sorted(spans)
    assert second[0] >= first[1], spans


def test_workers_run_the_ninja_beside_their_torch() -> None:
    """`pretrain run` puts its interpreter's bin folder first on the workers' PATH: a system
    ninja (1.11 here) and the venv's (1.13) read each other's build logs as foreign, and the
    CPU op was rebuilt from scratch each time one took over from the other."""
    import os
    import sys

    from pretrain.launch import interpreter_first

    own = str(Path(sys.executable).parent)
    assert interpreter_first("/usr/bin:/bin").split(os.pathsep) == [own, "/usr/bin", "/bin"]
    assert interpreter_first(f"/usr/bin:{own}:/bin").split(os.pathsep) == [own, "/usr/bin", "/bin"], "once"
    assert interpreter_first("") == own
