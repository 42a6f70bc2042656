"""training.compile on CPU: the engine's model compiled by torch.compile (inductor) trains to the
same losses as eager, logs its compile time, and writes checkpoints and an export that an eager
run reads (the compiled module keeps its parameter names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer_runs import run_job

pytestmark = pytest.mark.slow  # torchrun: not in `make test-fast`

ONE_LAYER = ["model.layers=1", "training.maxSteps=6", "training.zero.stage=1", "checkpoint.intervalSteps=3"]


def test_a_compiled_run_matches_eager_and_its_checkpoint_resumes_eager(tmp_path: Path) -> None:
    eager = run_job(tmp_path / "eager", [*ONE_LAYER, "training.compile=false"], nproc=1)
    assert eager.proc.returncode == 0, eager.output[-3000:]
    assert "compiled" not in eager.output
    compiled = run_job(tmp_path / "compiled", [*ONE_LAYER, "training.compile=true"], nproc=1)
    assert compiled.proc.returncode == 0, compiled.output[-3000:]
    assert ", compiled," in compiled.output and "compiled the model in its first step:" in compiled.output
    want, got = eager.losses(), compiled.losses()
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert abs(want[step] - got[step]) < 2e-3 * abs(want[step]), (step, want[step], got[step])
    assert (compiled.out / "checkpoints" / "final" / "model.safetensors").exists()
    # The compiled run's checkpoint resumes in an eager run: the same parameter names.
    longer = run_job(compiled.out, [*ONE_LAYER, "training.compile=false", "training.maxSteps=8"], nproc=1)
    assert longer.proc.returncode == 0, longer.output[-3000:]
    assert "resumed from" in longer.output and "(step 6)" in longer.output
    assert max(longer.losses()) == 8
