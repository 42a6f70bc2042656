"""Shared fixtures: paths, example jobs, and an isolated environment for subprocesses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.kubeapi.server import ApiServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def subprocess_env(tmp: Path) -> dict[str, str]:
    """Environment for a trainer subprocess: offline, CPU, temp files inside `tmp`."""
    env = dict(os.environ)
    env.update(
        {
            "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    """The API emulator (tests/kubeapi) with the PretrainJob CRD installed, for one test."""
    from tests.kubeapi.harness import start_apiserver

    server = start_apiserver(tmp_path / "api")
    yield server
    server.stop()


from tests.images import images  # noqa: E402,F401  (fixture)
from tests.s3server import s3  # noqa: E402,F401  (fixture)
