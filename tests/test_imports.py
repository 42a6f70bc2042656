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


def _imports(path: str) -> set[tuple[str, str]]:
    """(file, imported module) for every import statement of a module or a package's files."""
    import ast
    from pathlib import Path

    root = Path(pretrain.__path__[0]) / path.removeprefix("pretrain").strip(".").replace(".", "/")
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    out = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add((f.name, node.module))
            elif isinstance(node, ast.Import):
                out.update((f.name, a.name) for a in node.names)
    return out


@pytest.mark.parametrize(("package", "forbidden"), [
    ("pretrain.operator", "pretrain.trainer"),  # the pod contract is pretrain.contract
    ("pretrain.operator", "torch"),
    ("pretrain.api", "pretrain.trainer"),
    ("pretrain.contract", "pretrain"),  # a leaf: nothing of the project
])  # fmt: skip
def test_layers(package: str, forbidden: str) -> None:
    """Issue 30: the operator and the trainer share only pretrain.contract (and the metric names);
    neither imports the other."""
    wrong = sorted(f"{f} imports {m}" for f, m in _imports(package) if m == forbidden or m.startswith(f"{forbidden}."))
    assert not wrong, wrong
