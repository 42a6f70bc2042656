"""Resuming at another world size or ZeRO stage (the universal checkpoint format), end to end:
real `pretrain run`s of 1-3 processes over gloo, compared step by step with the run that was
not interrupted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trainer_runs import Run, run_job

pytestmark = pytest.mark.slow

#: Global batch 12 divides by 1, 2 and 3 processes of micro-batch 2; a checkpoint at step 6.
RESIZABLE = ["training.globalBatchSize=12", "checkpoint.intervalSteps=6"]

#: fp32 on CPU: another world size only changes the order of reductions (seen: at most 2e-7).
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every run of this module streams its data from one shared cacheUri (issue 28 item 2)."""
    RESIZABLE.append(f"data.cacheUri=file://{tmp_path_factory.mktemp('bucket')}")
    yield
    RESIZABLE.pop()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """12 steps at 2 processes, one run per ZeRO stage that the resizes start from."""
    base = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for stage in (1, 2, 3):
        run = run_job(base / f"zero{stage}", [*RESIZABLE, f"training.zero.stage={stage}"])
        assert run.proc.returncode == 0, run.output[-3000:]
        out[stage] = run
    return out


def checkpoints_at_step_6(source: Path, out: Path) -> Path:
    """A copy of `source`'s checkpoints as a run stopped after step 6 would have left them."""
    shutil.copytree(source, out / "checkpoints")
    for later in ("step-00000012", "final", ".pretrain-lease.json"):
        target = out / "checkpoints" / later
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
    return out / "checkpoints"


def assert_continues(resumed: Run, reference: Run) -> None:
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert "is prepared: streaming it" in resumed.output and not (resumed.out / "work" / "data").exists()
    got, want = resumed.losses(), reference.losses()
    assert sorted(got) == list(range(7, 13)), "the step count continues from the checkpoint"
    for step in got:
        assert abs(got[step] - want[step]) < TOLERANCE, (step, got[step], want[step])
    loader = lambda run: json.loads((run.out / "checkpoints" / "step-00000012" / "loader.json").read_text())  # noqa: E731
    assert loader(resumed) == loader(reference), "the data position continues exactly"
    lr = {e["step"]: e["lr"] for e in resumed.log if "lr" in e}
    assert all(abs(lr[e["step"]] - e["lr"]) < 1e-12 for e in reference.log if "lr" in e and e["step"] in lr), "LR"


def test_zero2_resumes_at_1_then_at_3_processes(uninterrupted: dict[int, Run], tmp_path: Path) -> None:
    source = uninterrupted[2].out / "checkpoints"
    checkpoints_at_step_6(source, tmp_path / "one")
    one = run_job(tmp_path / "one", [*RESIZABLE, "training.zero.stage=2"], nproc=1)
    assert_continues(one, uninterrupted[2])
    assert "converted step-00000006 (2 processes, ZeRO-2) to the universal format for 1 processes" in one.output
    universal = tmp_path / "one" / "checkpoints" / "step-00000006" / "universal"
    manifest = json.loads((universal / "manifest.json").read_text())
    assert manifest["from_world_size"] == 2 and manifest["files"], manifest
    history = [
        json.loads(line) for line in (tmp_path / "one" / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    ]
    reshard = [e for e in history if e.get("event") == "reshard"]
    assert reshard and reshard[0]["seconds"] > 0 and reshard[0]["load_seconds"] > 0, reshard

    # The conversion is kept with its checkpoint: a later resize verifies it and reuses it.
    checkpoints_at_step_6(tmp_path / "one" / "checkpoints", tmp_path / "three")
    three = run_job(tmp_path / "three", [*RESIZABLE, "training.zero.stage=2"], nproc=3)
    assert_continues(three, uninterrupted[2])
    assert "step-00000006/universal, converted earlier, verified" in three.output
    assert "converted step-00000006" not in three.output


def test_zero1_resumes_as_zero3_at_3_processes(uninterrupted: dict[int, Run], tmp_path: Path) -> None:
    checkpoints_at_step_6(uninterrupted[1].out / "checkpoints", tmp_path)
    resumed = run_job(tmp_path, [*RESIZABLE, "training.zero.stage=3"], nproc=3)
    assert_continues(resumed, uninterrupted[1])
    assert "(2 processes, ZeRO-1) to the universal format for 3 processes at ZeRO-3" in resumed.output


def test_zero3_resumes_as_zero2_at_1_process(uninterrupted: dict[int, Run], tmp_path: Path) -> None:
    """The other direction: ZeRO-3's shards (flat, no whole module) into ZeRO-2's loader."""
    checkpoints_at_step_6(uninterrupted[3].out / "checkpoints", tmp_path)
    resumed = run_job(tmp_path, [*RESIZABLE, "training.zero.stage=2"], nproc=1)
    assert_continues(resumed, uninterrupted[3])


def test_zero0_resumes_at_another_size_as_it_is_and_refuses_another_stage(tmp_path: Path) -> None:
    """ZeRO-0 keeps the whole optimizer state in one file: it loads at any world size without
    conversion; a change to a sharded stage cannot be converted and is refused before training."""
    first = run_job(tmp_path, [*RESIZABLE, "training.zero.stage=0", "training.maxSteps=6"])
    assert first.proc.returncode == 0, first.output[-3000:]
    again = run_job(tmp_path, [*RESIZABLE, "training.zero.stage=2", "training.maxSteps=6"])
    assert again.proc.returncode == 1
    assert "step-00000006 was written at ZeRO-0 and this run uses ZeRO-2" in again.output
    assert max(again.losses()) == 6, "no step ran after the refusal"
    one = run_job(tmp_path, [*RESIZABLE, "training.zero.stage=0", "training.maxSteps=8"], nproc=1)
    assert one.proc.returncode == 0, one.output[-3000:]
    assert "resumed from" in one.output and "universal" not in one.output
    assert max(one.losses()) == 8
