"""The trainer's termination message: a failure's reason, or a finished run's summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.trainer.termination import parse_done, write_done, write_reason


def test_reason_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("PRETRAIN_TERMINATION_LOG", str(log))
    write_done({"step": 10, "totalSteps": 10})
    assert parse_done(log.read_text()) == {"step": 10, "totalSteps": 10}
    write_reason("first failure\nsecond line")  # a failure after the summary replaces it
    assert log.read_text() == "first failure\n"
    write_reason("a later rank's failure")  # the first reason wins
    assert log.read_text() == "first failure\n"
    assert parse_done("first failure") is None
    assert parse_done(json.dumps({"pretrainDone": {"step": 1}}) + "x" * 5000) is None, "bounded"
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)
    write_done({"trainLoss": float("nan")})  # not valid JSON: nothing is written over the reason
    assert log.read_text() == "first failure\n"
