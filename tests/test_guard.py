"""The loss guard (issue 29 item 1): the detector, and real runs given a NaN and a spike through
the test-only fault hook (guard.FAULT_ENV), which multiplies a step's loss before its backward."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pretrain.api.spec import GuardSpec
from pretrain.trainer.guard import FAULT_ENV, LossGuard, fault_from_env
from tests.conftest import subprocess_env
from tests.trainer_runs import Run, command


def rows(*losses: float, first: int = 1, grad: float | None = 1.0) -> list[dict[str, Any]]:
    return [{"step": first + i, "loss": x, "grad_norm": grad} for i, x in enumerate(losses)]


def test_a_non_finite_value_is_found_at_its_step() -> None:
    guard = LossGuard(GuardSpec())
    assert guard.check(rows(3.0, 2.9, 2.8)) is None
    found = guard.check(rows(2.7, math.nan, 2.6, first=4))
    assert found is not None and (found.step, found.kind) == (5, "nonfinite")
    found = guard.check(rows(2.5, first=7, grad=math.inf))
    assert found is not None and found.kind == "nonfinite", "an infinite gradient norm too"


def test_a_spike_is_a_z_score_over_the_window_once_there_is_history() -> None:
    guard = LossGuard(GuardSpec(spike_z_score=6, window_steps=10, min_history_steps=5))
    assert guard.check(rows(3.0, 9.0)) is None, "no history yet: not judged"
    guard = LossGuard(GuardSpec(spike_z_score=6, window_steps=10, min_history_steps=5))
    steady = [3.0 + 0.01 * (i % 3) for i in range(20)]
    assert guard.check(rows(*steady)) is None
    assert guard.check(rows(3.05, first=21)) is None, "within 6 standard deviations"
    found = guard.check(rows(3.3, first=22))
    assert found is not None and found.kind == "spike" and found.step == 22
    assert "standard deviations above the mean" in found.detail and "limit 6" in found.detail
    assert LossGuard(GuardSpec()).check(rows(*steady, 300.0)) is None, "spikes are off unless asked for"


def test_rollbacks_are_bounded_within_their_period() -> None:
    guard = LossGuard(GuardSpec(max_rollbacks=2, rollback_period_steps=100))
    assert guard.allow_rollback(10) is None and guard.allow_rollback(50) is None
    refused = guard.allow_rollback(90)
    assert refused == "2 rollbacks within 100 steps already (training.guard.maxRollbacks 2)"
    assert guard.allow_rollback(140) is None, "step 10's has aged out of the period"
    assert guard.allow_rollback(145) is not None, "step 50's and 140's have not"


def test_the_fault_hook_fires_once_or_onwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "7:nan")
    once = fault_from_env()
    assert once is not None and [once.factor_at(s) is not None for s in (6, 7, 7, 8)] == [False, True, False, False]
    monkeypatch.setenv(FAULT_ENV, "9+:50")
    onwards = fault_from_env()
    assert onwards is not None and [onwards.factor_at(s) for s in (8, 9, 10, 9)] == [None, 50.0, 50.0, 50.0]
    monkeypatch.delenv(FAULT_ENV)
    assert fault_from_env() is None


def faulty_run(out: Path, fault: str, sets: list[str]) -> Run:
    out.mkdir(parents=True)
    env = dict(subprocess_env(out), **{FAULT_ENV: fault})
    base = ["training.maxSteps=12", "checkpoint.intervalSteps=4", "training.logInterval=1"]
    proc = subprocess.run(command(out, [*base, *sets], nproc=1), capture_output=True, text=True, timeout=600, env=env)
    return Run(out, proc)


def history(run: Run) -> list[dict[str, Any]]:
    lines = (run.out / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_a_nan_rolls_back_to_the_last_checkpoint_and_skips_the_window(tmp_path: Path) -> None:
    """Step 7's loss is NaN (its update really applies NaN gradients): the guard finds it at the
    read-back, reloads step 4 and moves the loader past the data of steps 5-7; the run goes on
    from step 5 with step 8's data and ends finite, 12 steps trained on the other data."""
    run = faulty_run(tmp_path / "nan", "7:nan", [])
    assert run.proc.returncode == 0, run.output[-3000:]
    events = [e for e in history(run) if e.get("event") in ("guard", "rollback")]
    assert events[0] | {"time": 0} == {"time": 0, "event": "guard", "step": 7, "kind": "nonfinite",
                                       "action": "rollback", "loss": "nan"}  # fmt: skip
    batch = 8  # trainer_runs.SMALL: training.globalBatchSize=8
    assert {k: events[1][k] for k in ("step", "to_step", "skipped_positions")} == {
        "step": 7, "to_step": 4, "skipped_positions": [4 * batch, 7 * batch]}  # fmt: skip
    steps = [e["step"] for e in run.log if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12], steps
    assert all(math.isfinite(e["loss"]) for e in run.log if "loss" in e and e["step"] != 7)
    loader = json.loads((run.out / "checkpoints" / "step-00000008" / "loader.json").read_text())["loader"]
    assert loader["consumed"] == (7 + 4) * batch and loader["skipped"] == [[4 * batch, 7 * batch]], loader
    assert "rolled back to step-00000004" in run.output


@pytest.mark.slow
def test_spikes_past_the_bound_fail_the_run_in_one_line(tmp_path: Path) -> None:
    """Every step from 9 on is a spike (loss x50): one rollback (to step 8) is allowed, the next
    spike fails the run with one line."""
    sets = ["training.guard.spikeZScore=6", "training.guard.minHistorySteps=5", "training.guard.maxRollbacks=1"]
    run = faulty_run(tmp_path / "spike", "9+:50", sets)
    assert run.proc.returncode != 0
    assert [(e["event"], e["step"]) for e in history(run) if e.get("event") in ("guard", "rollback")] == [
        ("guard", 9), ("rollback", 9), ("guard", 9)]  # fmt: skip
    reason = (run.out / "work" / "termination.log").read_text().strip()
    assert reason.startswith("training.guard: spike loss at step 9 (loss ") and reason.endswith(
        "1 rollbacks within 1000 steps already (training.guard.maxRollbacks 1): failing"), reason  # fmt: skip
    assert "Traceback" not in run.output.split("training.guard: spike loss at step 9")[-1]


@pytest.mark.slow
def test_a_skipped_nan_step_leaves_the_weights_as_they_were(tmp_path: Path) -> None:
    """Step 7's loss is NaN under ZeRO-0 (no overflow check of DeepSpeed's in the way). With
    action warn its NaN gradients reach the weights and every later loss is NaN; with action skip
    the device leaves step 7's update out, the run trains on, steps 1-12 once each, all finite
    but step 7, and says so."""
    zero0 = ["training.zero.stage=0"]
    warned = faulty_run(tmp_path / "warn", "7:nan", [*zero0, "training.guard.action=warn"])
    assert warned.proc.returncode == 0, warned.output[-3000:]
    assert all(math.isnan(e["loss"]) for e in warned.log if "loss" in e and e["step"] > 7), "NaN poisons the weights"
    run = faulty_run(tmp_path / "skip", "7:nan", [*zero0, "training.guard.action=skip"])
    assert run.proc.returncode == 0, run.output[-3000:]
    steps = [e["step"] for e in run.log if "loss" in e]
    assert steps == list(range(1, 13)), steps
    assert all(math.isfinite(e["loss"]) for e in run.log if "loss" in e and e["step"] != 7)
    events = [e for e in history(run) if e.get("event") in ("guard", "rollback")]
    assert [(e["event"], e["step"], e["kind"], e["action"]) for e in events] == [("guard", 7, "nonfinite", "skip")]
    assert "training.guard: nonfinite loss at step 7 (loss nan, gradient norm None); its update was left out" in (
        run.output
    )


@pytest.mark.slow
def test_skipped_spikes_are_bounded_too(tmp_path: Path) -> None:
    """Every step from 9 on is a spike (loss x50) with action skip: step 9 is left out and the
    run goes on; step 10, one more than maxRollbacks allows, fails the run in one line."""
    sets = ["training.guard.action=skip", "training.guard.spikeZScore=6", "training.guard.minHistorySteps=5",
            "training.guard.maxRollbacks=1"]  # fmt: skip
    run = faulty_run(tmp_path / "spikes", "9+:50", sets)
    assert run.proc.returncode != 0
    assert [(e["event"], e["step"], e["kind"]) for e in history(run) if e.get("event") == "guard"] == [
        ("guard", 9, "spike"), ("guard", 10, "spike")]  # fmt: skip
    reason = (run.out / "work" / "termination.log").read_text().strip()
    assert reason.startswith("training.guard: spike loss at step 10 (loss ") and reason.endswith(
        "1 skipped steps within 1000 steps already (training.guard.maxRollbacks 1): failing"), reason  # fmt: skip
