"""The import layers (issue 30): pyproject.toml's [tool.importlinter] contracts hold for the
package as it is, and they do break when a module imports against them (checked on a copy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--config", str(ROOT / "pyproject.toml")]


def lint(src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(LINT, capture_output=True, text=True, env=env, cwd=src, timeout=120, check=False)


def test_the_package_keeps_its_import_contracts() -> None:
    done = lint(ROOT / "src")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout and "kept" in done.stdout


def test_an_import_against_the_layers_breaks_them(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "pretrain", tmp_path / "pretrain", ignore=shutil.ignore_patterns("__pycache__"))
    planner = tmp_path / "pretrain" / "operator" / "planner.py"
    planner.write_text(planner.read_text() + "\nfrom pretrain.trainer import recipe  # noqa\n")
    api = tmp_path / "pretrain" / "api" / "presets.py"
    api.write_text(api.read_text() + "\nfrom pretrain.data import order  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any("neither imports the other" in b for b in broken), done.stdout[-3000:]
    assert any("Layers: trainer > tasks" in b for b in broken), done.stdout[-3000:]
    assert any("operator imports no torch" in b for b in broken), done.stdout[-3000:]
    assert any("No import circle" in b for b in broken), done.stdout[-3000:]  # api -> data -> api


def test_the_architecture_table_names_each_rooms_imports() -> None:
    """docs/architecture.md's "depends on" column lists, for each room, exactly the rooms of
    pretrain its modules import (at run time; issue 30 item 7: the column had gone wrong)."""
    import re

    import grimp

    graph = grimp.build_graph("pretrain", exclude_type_checking_imports=True)
    rows = [r for r in (ROOT / "docs" / "architecture.md").read_text().splitlines() if r.startswith("| `pretrain.")]
    assert len(rows) >= 12
    for row in rows:
        room, _, depends = (c.strip() for c in row.strip("|").split("|"))
        top = re.match(r"`pretrain\.(\w+)`", room)
        assert top, row
        files = re.findall(r"`(\w+)\.py`", room) or [f"{top.group(1)}.py"]
        mine = {f"pretrain.{f.removesuffix('.py')}" for f in files}
        imported = set()
        for module in graph.modules:
            if module in mine or any(module.startswith(f"{m}.") for m in mine):
                imported |= {t.split(".")[1] for t in graph.find_modules_directly_imported_by(module) if t.count(".")}
        own = {m.split(".")[1] for m in mine}
        named = {n.split(".")[0] for n in re.findall(r"`(\w[\w.]*)`", depends)}
        assert named == imported - own, f"{room}: the table says {sorted(named)}, the code {sorted(imported - own)}"
