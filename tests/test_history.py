"""The run's history (metrics.jsonl, TensorBoard) and `pretrain report` over real tiny runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest

from pretrain.metrics.history import RunHistory, current_records, parse_history
from tests.conftest import ROOT, subprocess_env
from tests.trainer_runs import run_job

WRITER = """
import sys
from pathlib import Path
from pretrain.metrics.history import RunHistory
h = RunHistory(sys.argv[1], Path(sys.argv[1]))
i = 0
while True:
    i += 1
    h.log({"step": i, "loss": 1.0 / i, "pad": "x" * 3000})
"""


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_line(tmp_path: Path) -> None:
    h = RunHistory(str(tmp_path), tmp_path)
    h.log({"step": 1, "loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": 1.9')  # what a crash mid-write leaves
    assert [r["step"] for r in parse_history((tmp_path / "metrics.jsonl").read_text())] == [1]
    RunHistory(str(tmp_path), tmp_path).log({"step": 2, "loss": 1.8})
    records = parse_history((tmp_path / "metrics.jsonl").read_text())
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.8)]


def test_history_survives_kill_9_of_its_writer(tmp_path: Path) -> None:
    history = tmp_path / "metrics.jsonl"
    for delay in (0.0, 0.05, 0.1):
        before = history.stat().st_size if history.exists() else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=subprocess_env(tmp_path))
        deadline = time.monotonic() + 60  # the writer has started writing (an import is slow on a busy machine)
        while (history.stat().st_size if history.exists() else 0) < before + 20_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = [r["step"] for r in parse_history((tmp_path / "metrics.jsonl").read_text())]
    assert len(steps) > 10
    runs = [i for i, s in enumerate(steps) if s == 1]
    assert len(runs) == 3, "three writers, each starting at step 1"
    for a, b in zip(runs, [*runs[1:], len(steps)], strict=True):
        assert steps[a:b] == list(range(1, b - a + 1)), "no record lost or torn before the kill point"


def test_a_resumed_attempt_supersedes_what_came_after_its_checkpoint() -> None:
    records = [
        {"event": "start", "step": 0}, {"step": 10, "loss": 3.0}, {"event": "checkpoint", "step": 10},
        {"step": 12, "loss": 2.9}, {"event": "start", "step": 10}, {"step": 12, "loss": 2.8},
    ]  # fmt: skip
    kept = current_records(records)
    assert [(r.get("event"), r["step"], r.get("loss")) for r in kept] == [
        ("start", 0, None), (None, 10, 3.0), ("checkpoint", 10, None), ("start", 10, None), (None, 12, 2.8)]  # fmt: skip


@pytest.mark.slow
def test_report_plots_what_the_runs_logged(tmp_path: Path) -> None:
    common = ["training.logInterval=1", "training.evalInterval=4", "training.schedule.warmupSteps=4"]
    first = run_job(tmp_path / "first", [*common, "monitoring.tensorboard=true"])
    assert first.proc.returncode == 0, first.output[-3000:]
    # --nproc 1 with a batch only one process can split: validated at the world size that runs;
    # two sources in two mixture stages: only `a` for the first 6 steps (6 x 2 x 32 tokens), then only `b`
    text = (ROOT / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt").read_text()
    (tmp_path / "a.txt").write_text(text[: len(text) // 2])
    (tmp_path / "b.txt").write_text(text[len(text) // 2 :])
    mixture = [f"data.sources=[{{uri: {tmp_path / 'a.txt'}}}, {{uri: {tmp_path / 'b.txt'}}}]",
               "data.stages=[{untilTokens: 384, weights: [1, 0]}, {weights: [0, 1]}]"]  # fmt: skip
    second = run_job(tmp_path / "second", [*common, "training.globalBatchSize=2", "training.microBatchSize=2", *mixture],
                     nproc=1)  # fmt: skip
    assert second.proc.returncode == 0, second.output[-3000:]

    history = current_records(parse_history((tmp_path / "first" / "checkpoints" / "metrics.jsonl").read_text()))
    starts = [r for r in history if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["job"]["spec"]["monitoring"]["tensorboard"] is True
    assert any(r.get("event") == "checkpoint" for r in history)

    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "pretrain.cli", "report", str(tmp_path / "first"), str(tmp_path / "second"),
                        "--output", str(out)], capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"report: {out / 'report.html'}"
    for stem in ("loss", "lr", "grad_norm", "tokens_per_second"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "step-00000012" in page and "hidden: 32" in page, "checkpoint list and spec on the page"

    curves = json.loads((out / "curves.json").read_text())
    for label, run in (("tiny-cpu (first)", first), ("tiny-cpu (second)", second)):
        want = run.losses()
        assert len(want) == 12
        if run is first:
            sources = curves["sources"][f"{label}: builtin://tinyshakespeare"]  # tokens by data source, logged
            assert sources["y"] == [s * 8 * 32 for s in sources["x"]] and sources["x"][-1] == 12.0
        else:  # the stages: a's count stops at the boundary, b's starts there
            a, b = (curves["sources"][f"{label}: {tmp_path / n}"] for n in ("a.txt", "b.txt"))
            assert a["y"] == [min(s, 6) * 64 for s in a["x"]] and a["x"][-1] == 12.0
            assert b["y"] == [(s - 6) * 64 for s in b["x"]] and b["x"][0] == 7.0
        line = curves["loss"][f"{label}: train"]  # runs of one job are told apart by their folder
        assert line["x"] == [float(s) for s in sorted(want)]
        assert line["y"] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6)
    evals = [e for e in first.log if "eval_loss" in e]
    eval_line = curves["loss"]["tiny-cpu (first): eval"]
    assert eval_line["x"] == [float(e["step"]) for e in evals]
    assert eval_line["y"] == pytest.approx([e["eval_loss"] for e in evals], rel=1e-6)
    lr_line = curves["lr"]["tiny-cpu (first): lr"]
    assert lr_line["y"] == pytest.approx([e["lr"] for e in first.log if "loss" in e], rel=1e-6)
    # where the trainer's time went (goodput), cumulative: training grows with every step; the
    # evaluation every 4 steps and the restart (setup) overhead are there too
    training = curves["time"]["tiny-cpu (first): training"]
    assert training["x"] == [float(s) for s in range(1, 13)] and all(b > a for a, b in pairwise(training["y"]))
    steps = sum(e["seconds"] for e in first.log if "loss" in e)
    assert training["y"][-1] == pytest.approx(steps, rel=0.01), "the steps' own seconds, as train_log.jsonl has them"
    assert curves["time"]["tiny-cpu (first): restart"]["y"][0] > 0 and "tiny-cpu (first): evaluation" in curves["time"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "first" / "checkpoints" / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb == pytest.approx(first.losses(), rel=1e-5)


def test_report_names_what_is_missing(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pretrain.cli", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: {tmp_path}: no metrics.jsonl here")


def test_report_skips_and_counts_hand_broken_records(tmp_path: Path) -> None:
    """Issue 33 item 5: `{"event": "start", "step": "resume"}` ended the report with a bare
    ValueError, a step of NaN or 1e999 with ValueError/OverflowError naming no file or line."""
    lines = [
        json.dumps({"event": "start", "step": 0, "job": {"metadata": {"name": "hand"}}}),
        json.dumps({"step": 1, "loss": 3.0, "lr": 0.1}),
        json.dumps({"event": "start", "step": "resume"}),
        '{"step": NaN, "loss": 2.0}',
        '{"step": 1e999, "loss": 2.0}',
        '{"step": 2, "loss": Infinity}',
        '{"step": true, "loss": 2.5}',
        "[1, 2]",
        json.dumps({"step": 3, "loss": 2.0, "lr": 0.1}),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    p = subprocess.run([sys.executable, "-m", "pretrain.cli", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    warning = p.stderr.strip().splitlines()[0]
    assert warning.startswith(f'warning: {tmp_path}/metrics.jsonl: skipped 6 record(s) (line 3: step is "resume"')
    assert "line 4: step is NaN" in warning and "line 5: step is Infinity" in warning
    curves = json.loads((tmp_path / "report" / "curves.json").read_text())
    assert curves["loss"]["train"]["x"] == [1, 3]
