"""Goodput (issue 29 item 5): where a job's wall time went, kept in its status as closed totals
that add up to the wall time."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from pretrain.operator import goodput
from pretrain.timestamps import parse_time
from tests.operator.harness import Harness, job_body

T0 = datetime(2026, 1, 1)


def test_phases_are_credited_when_left_and_trainer_time_splits_running() -> None:
    g: dict[str, Any] = {}
    goodput.enter_phase(g, None, T0)
    goodput.enter_phase(g, "Pending", T0 + timedelta(seconds=30))
    goodput.enter_phase(g, "Running", T0 + timedelta(seconds=130))
    status = {"progress": {"step": 40, "time": {"attempt": 1, "restart": 10, "training": 80, "checkpoint": 5,
                                                 "stepSeconds": 2.0}},
              "lastCheckpoint": {"step": 35}}  # fmt: skip
    goodput.end_attempt(g, 1, status, None)
    goodput.end_attempt(g, 1, status, None)  # once per attempt
    s = g["seconds"]
    assert (s["queued"], s["restart"], s["checkpoint"]) == (30.0, 10.0, 5.0)
    assert (s["training"], s["recomputed"]) == (70.0, 10.0), "5 steps past the last checkpoint, 2 s each, redone"
    assert s["other"] == 100 - 10 - 70 - 10 - 5 and s["total"] == 130.0 and s["ratio"] == round(70 / 130, 4)


def test_an_attempt_nothing_was_scraped_of_counts_as_other() -> None:
    g: dict[str, Any] = {}
    goodput.enter_phase(g, None, T0)
    goodput.enter_phase(g, "Running", T0 + timedelta(seconds=50))
    goodput.end_attempt(g, 1, {"progress": {"time": {"attempt": 0, "training": 99}}}, None)
    assert g["seconds"]["other"] == 50.0 and g["seconds"]["training"] == 0.0


def scrape(h: Harness, attempt: int, **time: float) -> None:
    h.status.setdefault("progress", {})["time"] = {"attempt": attempt, **time}


def test_a_job_through_a_restart_adds_up_to_its_wall_time() -> None:
    h = Harness(job_body({"resources.nodes": 1, "checkpoint.uri": "s3://b/ck", "runPolicy.restartBackoffSeconds": 10}))
    h.reconcile()
    h.advance(20)
    h.run_all()
    h.reconcile()  # Running after 20 s queued
    h.advance(100)
    scrape(h, 1, restart=15, training=70, checkpoint=5, stepSeconds=1.0)
    h.status["progress"]["step"], h.status["lastCheckpoint"] = 30, {"step": 25}
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1, message="boom")
    h.reconcile()
    assert h.phase == "Restarting"
    h.cluster.settle()
    h.advance(10)
    h.reconcile()  # attempt 2's pods
    h.advance(5)
    h.run_all()
    h.reconcile()
    h.advance(60)
    done = '{"pretrainDone": {"step": 60, "totalSteps": 60, "time": {"restart": 12, "training": 40, "checkpoint": 3}}}'
    h.cluster.set_phase("tiny-a2-n0", "Succeeded", exit_code=0, message=done)
    h.reconcile()
    assert h.phase == "Succeeded"
    s = h.status["goodput"]["seconds"]
    wall = (parse_time(h.status["completionTime"]) or T0) - (parse_time(h.status["startTime"]) or T0)
    assert s["total"] == pytest.approx(wall.total_seconds(), rel=0.01), (s, wall)
    assert s["restart"] == 27.0 and s["recomputed"] == 5.0 and s["training"] == 105.0, s
    assert s["restarting"] == 10.0 and s["queued"] == 25.0, "20 s before the first run, 5 s before the second"
    assert s["ratio"] == round(105 / s["total"], 4)
