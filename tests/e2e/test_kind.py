"""The kind end-to-end run, for machines with Docker (marker `docker`; deselected by `make test`)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.docker
def test_kind_end_to_end() -> None:
    proc = subprocess.run([str(ROOT / "tests" / "e2e" / "kind.sh")], check=False, timeout=3600)
    assert proc.returncode == 0
