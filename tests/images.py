"""The product's images, built once per test session with `make images` (podman)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import containers
from tests.conftest import ROOT

PREFIX, TAG = "ghcr.io/pretrain-io", "0.1.0"


@dataclass(frozen=True)
class Images:
    operator: str
    trainer_cpu: str
    build_log: str


@pytest.fixture(scope="session")
def images() -> Iterator[Images]:
    why = containers.available()
    if why:
        pytest.skip(f"container tests need podman: {why} (.ci/run installs it)")
    done = subprocess.run(["make", "images"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"make images failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    yield Images(f"{PREFIX}/pretrain-operator:{TAG}", f"{PREFIX}/pretrain-trainer-cpu:{TAG}", done.stdout)
