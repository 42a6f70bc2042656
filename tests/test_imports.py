"""Every light module imports on its own, first, in a fresh interpreter: an import cycle that only
shows for one import order (data.loader before api) broke the trainer's entry points once."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import pretrain

LIGHT = ("pretrain.api", "pretrain.data", "pretrain.storage", "pretrain.operator", "pretrain.metrics")
MODULES = sorted(m.name for m in pkgutil.walk_packages(pretrain.__path__, "pretrain.") if m.name.startswith(LIGHT))


def test_modules_found() -> None:
    assert len(MODULES) >= 20 and "pretrain.data.loader" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_first(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
