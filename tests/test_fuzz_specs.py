"""Hostile job files never give a traceback, a hang or unbounded memory (tests/fuzz_specs.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_150_mutated_job_files() -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_specs", "150", "16"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, check=False)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["bad"] == 0, "\n".join(lines[-20:]) + proc.stderr[-2000:]
    assert summary["cases"] == 150
