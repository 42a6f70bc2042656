"""monitoring.mlflow (issue 31 item 3) against a real `mlflow server` (sqlite backend, a local
artifact root) started here from `make mlflow`'s venv, read back through MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pretrain.metrics.mlflow import flat_params, metric_points
from tests.conftest import ROOT, subprocess_env
from tests.test_run_guards import processes_of
from tests.trainer_runs import Run, command, free_port

MLFLOW = ROOT / ".cache" / "mlflow-venv" / "bin" / "mlflow"
RUN = ["training.maxSteps=12", "checkpoint.intervalSteps=4", "training.logInterval=1", "training.evalInterval=0"]
#: Steps of about 0.1 s here (tests/test_soak.py's shape) and 40 of them: the first attempt is still
#: training seconds after its step-4 checkpoint is committed, so the kill lands mid-run.
SLOWER = ["training.maxSteps=40", "model.hidden=128", "model.heads=4", "model.intermediate=256",
          "model.maxPositions=256", "data.sequenceLength=256"]  # fmt: skip

READ_BACK = """
import json, sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2])
out = []
for run in client.search_runs([experiment.experiment_id]):
    history = {key: [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    out.append({"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
                "tags": run.data.tags, "history": history})
print(json.dumps(out))
"""


def test_history_records_become_metric_points_and_the_spec_params() -> None:
    rec = {
        "time": 1.5,
        "step": 3,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": None,
        "mfu": float("nan"),
        "eval_accuracy": 0.5,
    }
    assert metric_points(rec) == [
        {"key": "train/loss", "value": 2.5, "timestamp": 1500, "step": 3},
        {"key": "train/lr", "value": 1e-3, "timestamp": 1500, "step": 3},
        {"key": "eval/accuracy", "value": 0.5, "timestamp": 1500, "step": 3},
    ]
    assert metric_points({"event": "checkpoint", "step": 4, "seconds": 1.0}) == []
    assert flat_params({"training": {"maxSteps": 12, "zero": {"stage": 2}}, "data": {"sources": [{"uri": "x"}]}}) == [
        {"key": "training.maxSteps", "value": "12"}, {"key": "training.zero.stage", "value": "2"},
        {"key": "data.sources", "value": '[{"uri": "x"}]'}]  # fmt: skip


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert MLFLOW.exists(), f"{MLFLOW} is missing: `make mlflow` makes it (make test does)"
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    with open(root / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root",
             str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


def read_back(uri: str, experiment: str) -> list[dict[str, Any]]:
    python = MLFLOW.parent / "python"
    done = subprocess.run([str(python), "-c", READ_BACK, uri, experiment], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout))


def logged_steps(out: Path) -> list[int]:
    path = out / "work" / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


@pytest.mark.slow
def test_two_attempts_are_one_mlflow_run_without_gaps_or_duplicates(tracking: str, tmp_path: Path) -> None:
    """The first attempt is killed -9 once past step 6 with its checkpoint at step 4 committed;
    the second resumes and finishes: one MLflow run, train/loss at steps 1-40 once each."""
    out = tmp_path / "run"
    out.mkdir()
    sets = [*RUN, *SLOWER, f"monitoring.mlflow.trackingUri={tracking}", "monitoring.mlflow.experiment=two-attempts"]
    first = subprocess.Popen(command(out, sets, nproc=1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=subprocess_env(out), cwd=out, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    committed = out / "checkpoints" / "step-00000004" / "manifest.json"
    while max(logged_steps(out), default=0) < 6 or not committed.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first attempt did not reach step 6"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(60)
    deadline = time.monotonic() + 60
    while processes_of(out):
        assert time.monotonic() < deadline, "processes of the killed attempt are left"
        time.sleep(0.2)
    second = Run(out, subprocess.run(command(out, sets, nproc=1), capture_output=True, text=True, timeout=600,
                                     env=subprocess_env(out), cwd=out))  # fmt: skip
    assert second.proc.returncode == 0, second.output[-3000:]
    assert "resumed from" in second.output
    runs = read_back(tracking, "two-attempts")
    assert len(runs) == 1, [r["name"] for r in runs]
    run = runs[0]
    assert run["name"] == "tiny-cpu" and run["status"] == "FINISHED"
    assert [step for step, _ in run["history"]["train/loss"]] == list(range(1, 41))
    assert run["params"]["training.maxSteps"] == "40" and run["params"]["model.family"] == "gpt2"
    assert run["tags"]["pretrain.export"].endswith("/checkpoints/final"), run["tags"]
    assert [step for step, _ in run["history"]["eval/loss"]] == [40]


@pytest.mark.slow
def test_mlflow_down_for_the_whole_run_costs_a_warning(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "run"
    out.mkdir()
    sets = [*RUN, f"monitoring.mlflow.trackingUri={down}"]
    done = subprocess.run(command(out, sets, nproc=1), capture_output=True, text=True, timeout=600,
                          env=subprocess_env(out), cwd=out)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count(f"MLflow tracking at {down} failed") == 1, output[-3000:]
    assert output.count("metric point(s) of this run were not sent") == 1, output[-3000:]
    assert len(logged_steps(out)) == 12


@pytest.mark.slow
def test_a_run_made_by_an_attempt_that_died_before_naming_it_is_continued(tracking: str) -> None:
    """An attempt killed between making the MLflow run and writing its id beside the checkpoints
    left a run that no file names: the next attempt finds it by its checkpoint-location tag."""
    from pretrain.api import load_job
    from pretrain.metrics.mlflow import MlflowMirror, RunFile

    job = load_job(ROOT / "examples" / "tiny-cpu.yaml", [f"monitoring.mlflow.trackingUri={tracking}",
                                                         "monitoring.mlflow.experiment=orphan"])  # fmt: skip
    assert job.spec.monitoring.mlflow is not None

    def killed(_: dict[str, Any]) -> None:
        raise OSError("the attempt died here")

    first = MlflowMirror(job.spec.monitoring.mlflow, job, RunFile(lambda: None, killed, "/ckpt/orphan"))
    first.start([], 0).close()
    kept: dict[str, Any] = {}
    second = RunFile(lambda: kept.get("run"), lambda run: kept.update(run=run), "/ckpt/orphan")
    MlflowMirror(job.spec.monitoring.mlflow, job, second).start([{"time": 1.0, "step": 1, "loss": 2.0}], 1).close()
    runs = read_back(tracking, "orphan")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED", runs
    assert runs[0]["params"]["training.maxSteps"] == str(job.spec.training.max_steps)
    assert runs[0]["history"]["train/loss"] == [[1, 2.0]] and kept["run"]["runId"]
