"""Helpers that run real jobs through `pretrain run` (torchrun + DeepSpeed on CPU) for tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, subprocess_env

TINY = ROOT / "examples" / "tiny-cpu.yaml"

#: The smallest job that still shows learning: 2 layers of width 32 on 32-character sequences.
SMALL = [
    "model.hidden=32", "model.heads=2", "model.intermediate=64", "model.maxPositions=64",
    "data.sequenceLength=32", "data.validationSplit=0.05",
    "training.maxSteps=12", "training.globalBatchSize=8", "training.microBatchSize=2",
    "training.schedule.warmupSteps=2", "training.evalInterval=0", "training.evalSteps=2",
    "training.logInterval=1", "checkpoint.intervalSteps=100",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess[str]

    @property
    def log(self) -> list[dict[str, Any]]:
        path = self.out / "work" / "train_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def losses(self) -> dict[int, float]:
        """Training loss by step (the last record of a step wins, as after a resume)."""
        return {e["step"]: e["loss"] for e in self.log if "loss" in e}

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def command(out: Path, overrides: list[str], nproc: int = 2, job: Path = TINY) -> list[str]:
    sets = [a for o in [*SMALL, f"monitoring.metricsPort={free_port()}", *overrides] for a in ("--set", o)]
    return [sys.executable, "-m", "pretrain.cli", "run", str(job), "--nproc", str(nproc), "--output", str(out), *sets]


def run_job(out: Path, overrides: list[str], *, nproc: int = 2, timeout: float = 600, job: Path = TINY) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        command(out, overrides, nproc, job), capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(out), check=False, cwd=out,
    )  # fmt: skip
    return Run(out, proc)
