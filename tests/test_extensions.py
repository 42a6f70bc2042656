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
