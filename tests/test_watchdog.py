"""Hang detection in the trainer (issue 29 item 2): the watchdog, and a real run with a rank
stopped mid-way."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pretrain.contract import STALLED, is_stalled, stalled_message
from pretrain.trainer.watchdog import MIN_STALL_SECONDS, STARTUP_STALL_SECONDS, Watchdog, stall_limit
from tests.trainer_runs import command


def test_the_derived_limit_is_generous_and_an_explicit_one_wins() -> None:
    assert stall_limit(None, 0, 0.0) == stall_limit(None, 1, 500.0) == STARTUP_STALL_SECONDS
    assert stall_limit(None, 2, 1.0) == MIN_STALL_SECONDS, "fast steps: at least the minimum"
    assert stall_limit(None, 5, 120.0) == 2400.0, "slow steps: 20 of the longest"
    assert stall_limit(45.0, 0, 0.0) == stall_limit(45.0, 9, 999.0) == 45.0


def test_it_fires_once_with_the_stuck_threads_stack_and_not_while_beats_come() -> None:
    now = [0.0]
    fired: list[tuple[str, str]] = []
    dog = Watchdog(60.0, rank=3, fire=lambda r, s: fired.append((r, s)), clock=lambda: now[0])
    for _ in range(10):
        now[0] += 50.0
        dog.beat(1.0)
        assert not dog.check()
    stuck = threading.Event()

    def waiting_in_a_collective() -> None:
        stuck.wait(10)

    t = threading.Thread(target=waiting_in_a_collective, name="stuck")
    t.start()
    try:
        now[0] += 61.0
        assert dog.check()
    finally:
        stuck.set()
        t.join()
    ((reason, stacks),) = fired
    assert reason == "no progress on rank 3 for 61s (limit 60s, after step 10)"
    assert "waiting_in_a_collective" in stacks and "test_watchdog.py" in stacks


def test_the_termination_message_keeps_the_reason_first_and_fits_kubernetes() -> None:
    message = stalled_message("no progress on rank 1 for 61s", "Thread 0x1 (most recent call first):\n" + "x" * 9000)
    assert message.splitlines()[0] == f"{STALLED}: no progress on rank 1 for 61s" and is_stalled(message)
    assert len(message.encode()) <= 4096 and "most recent call first" in message


def children_named(root: psutil.Process, module: str) -> list[psutil.Process]:
    found = []
    for p in root.children(recursive=True):
        try:
            if module in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_with_stacks_within_the_timeout(tmp_path: Path) -> None:
    """Rank 1 of 2 is SIGSTOPped after step 3: rank 0 waits in its all-reduce until its watchdog
    fires (stallTimeoutSeconds 30), which leaves `Stalled: ...` and its stacks as the termination
    message; torchrun ends the other and `pretrain run` fails with that line."""
    from tests.conftest import subprocess_env

    cmd = command(tmp_path, ["training.maxSteps=400", "runPolicy.stallTimeoutSeconds=30"], nproc=2)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(tmp_path)
    )
    log = tmp_path / "work" / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.exists() and '"step": 3' in log.read_text()):
        time.sleep(0.5)
    ranks = children_named(psutil.Process(proc.pid), "pretrain.trainer")
    rank1 = [p for p in ranks if p.environ().get("RANK") == "1"]
    assert rank1, [p.cmdline() for p in ranks]
    rank1[0].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if rank1[0].is_running():
            rank1[0].send_signal(signal.SIGCONT)
        proc.kill()
    took = time.monotonic() - stopped_at
    assert proc.returncode != 0
    assert 25 < took < 150, f"the watchdog fired {took:.0f}s after the stop (limit 30s)"
    message = (tmp_path / "work" / "termination.log").read_text()
    first = message.splitlines()[0]
    assert first.startswith("Stalled: no progress on rank 0 for 3") and "limit 30s" in first, message[:500]
    assert "most recent call first" in message and "pretrain/trainer/" in message, message
    steps: list[Any] = [line for line in log.read_text().splitlines() if '"loss"' in line]
    assert len(steps) < 400, "it did not run to the end"
    assert "Stalled: no progress on rank 0" in output
