"""A kill -9 soak (issue 16): 20 SIGKILLs at random moments of a tiny run that checkpoints every
2 steps, alternately of the whole process tree and of the launcher alone. Each time, the run
resumes from a complete checkpoint (never a partial one) no more than one save behind, no process
of the killed run is left, and in the end the run finishes with every checkpoint verified."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.storage.checkpoint import CheckpointStore
from tests.conftest import subprocess_env
from tests.test_run_guards import processes_of
from tests.trainer_runs import command, run_job

pytestmark = pytest.mark.slow  # torchrun: not in `make test-fast`

KILLS = 20
INTERVAL = 2
#: Wide enough that a step takes a while (about 0.1 s here), long enough never to finish unkilled.
JOB = ["training.maxSteps=100000", "model.hidden=128", "model.heads=4", "model.intermediate=256",
       "model.maxPositions=256", "data.sequenceLength=256", f"checkpoint.intervalSteps={INTERVAL}",
       "checkpoint.keepLast=3"]  # fmt: skip


def logged_steps(out: Path) -> list[int]:
    log = out / "work" / "train_log.jsonl"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by the kill
        if "loss" in entry:
            steps.append(int(entry["step"]))
    return steps


def test_twenty_sigkills(tmp_path: Path) -> None:
    rng = random.Random(20)
    out = tmp_path / "run"
    out.mkdir()
    store = CheckpointStore(str(out / "checkpoints"), workdir=tmp_path / "inspect")
    resumed_at: list[int] = []
    for kill in range(KILLS):
        before = len(logged_steps(out))
        proc = subprocess.Popen(command(out, JOB), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=subprocess_env(out), cwd=out, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 180
        while len(logged_steps(out)) < before + 1 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        assert len(logged_steps(out)) > before, f"kill {kill}: no step within 180 s"
        time.sleep(rng.uniform(0.0, 1.5))
        reached = max(logged_steps(out))
        whole_tree = kill % 2 == 0
        if whole_tree:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: torchrun and the workers must follow
        output = proc.communicate(timeout=60)[0]
        deadline = time.monotonic() + 120
        while processes_of(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_of(out) == [], f"kill {kill}: processes of the killed run are left"
        m = re.search(r"resumed from .*step-(\d{8}) \(step (\d+)\)", output)
        if m:
            resumed_at.append(int(m.group(2)))
        complete = store.complete_steps()
        # at most one save lost: the newest complete checkpoint is within two intervals (the save in
        # flight and the one before it) of the step the run had reached
        assert complete and complete[-1] >= reached - 2 * INTERVAL - 1, (kill, reached, complete)
    final = run_job(out, [*JOB[1:], f"training.maxSteps={max(store.complete_steps()) + 2}"])
    assert final.proc.returncode == 0, final.output[-3000:]
    m = re.search(r"resumed from .*\(step (\d+)\)", final.output)
    assert m, final.output[-3000:]
    assert len(resumed_at) >= KILLS // 2, f"most runs resumed: {resumed_at}"
    for step in store.complete_steps():
        assert store.verify(step) is None, step
    assert (out / "checkpoints" / "final" / "config.json").exists()
