"""The trainer's termination message: a failure's reason, or a finished run's summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.termination import parse_done, write_done, write_reason


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
    write_done({"trainLoss": float("nan")})  # not valid JSON: nothing is written over the reason
    assert log.read_text() == "first failure\n"


def test_a_stalled_message_keeps_its_stacks_and_a_summary_gives_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pretrain.contract import PREPARED_KEY, parse_prepared, stalled_message
    from pretrain.termination import write_stalled

    log = tmp_path / "termination-log"
    monkeypatch.setenv("PRETRAIN_TERMINATION_LOG", str(log))
    write_done({"units": 2, "documents": 5, "tokens": 640, "other": "x"}, key=PREPARED_KEY)
    assert parse_prepared(log.read_text()) == {"units": 2, "documents": 5, "tokens": 640}
    assert parse_done(log.read_text()) is None, "a preparation summary is not a run's"
    write_stalled(stalled_message("no progress on rank 0 for 40s", "Thread 0x1 (most recent call first):\n  File x"))
    assert log.read_text().splitlines() == ["Stalled: no progress on rank 0 for 40s",
                                            "Thread 0x1 (most recent call first):", "  File x"]  # fmt: skip
    write_reason("a later rank's failure")
    assert log.read_text().startswith("Stalled: "), "the first failure wins"
