"""Trainer metrics scraped from a real 2-process run: promtool-clean, consistent with the
trainer's own log, and every dashboard query answered by a real Prometheus server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pretrain.operator.progress import parse_metrics
from tests.conftest import ROOT, subprocess_env
from tests.trainer_runs import command, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("promtool") is None, reason="needs Debian's prometheus package (.ci/run installs it)"
    ),
]
DASHBOARD = ROOT / "charts" / "pretrain-operator" / "dashboards" / "pretrain.json"


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


class LiveRun:
    def __init__(self, out: Path, port: int, proc: subprocess.Popen[str]) -> None:
        self.out, self.port, self.proc = out, port, proc

    def log(self) -> dict[int, dict[str, Any]]:
        rows = [json.loads(line) for line in (self.out / "work" / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    out = tmp_path_factory.mktemp("metrics-run")
    port = free_port()
    with socket.socket() as s:  # the second rank listens on port + 1
        s.bind(("127.0.0.1", port + 1))
    overrides = ["training.maxSteps=100000", "training.logInterval=5", "checkpoint.intervalSteps=20",
                 "monitoring.peakFlops=1e11", "training.evalInterval=50", f"monitoring.metricsPort={port}"]  # fmt: skip
    cmd = command(out, overrides)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(out),
                            cwd=out, start_new_session=True)  # fmt: skip
    run = LiveRun(out, port, proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, FileNotFoundError):
            if (
                "pretrain_checkpoint_last_verified_step" in get(f"http://127.0.0.1:{port}/metrics")
                and len(run.log()) > 50
            ):
                break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.5)
    yield run
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)


@pytest.mark.parametrize("rank", [0, 1])
def test_promtool_finds_no_problems(live: LiveRun, rank: int) -> None:
    text = get(f"http://127.0.0.1:{live.port + rank}/metrics")
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == ""
    assert f'rank="{rank}"' in text


def test_values_match_the_trainer_log(live: LiveRun) -> None:
    """Step, loss and token counters from one scrape agree with the log line of that step.
    A scrape can fall between two gauge updates of the loop, so a few are tried."""
    for _ in range(50):
        s = parse_metrics(get(f"http://127.0.0.1:{live.port}/metrics"))
        step = int(s["pretrain_step"])
        time.sleep(0.3)  # let the log line of that step land
        entry = live.log().get(step)
        if entry is None or s["pretrain_train_loss"] != entry["loss"]:
            continue
        assert s["pretrain_tokens_total"] == step * entry["tokens"]
        assert s["pretrain_samples_total"] * 32 == s["pretrain_tokens_total"]  # sequence length 32
        # one source: every token the job trained on came from it (the loader's count, per source)
        assert s["pretrain_data_source_tokens:builtin://tinyshakespeare"] == s["pretrain_tokens_total"]
        assert s["pretrain_learning_rate"] == entry["lr"]
        assert s["pretrain_total_steps"] == 100000
        assert s["pretrain_mfu_ratio"] > 0
        assert s["pretrain_checkpoint_last_verified_step"] % 20 == 0
        assert s["pretrain_attempt"] == 1
        return
    pytest.fail("never caught a scrape aligned with the log")


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_queries_answer_from_a_real_prometheus(live: LiveRun, tmp_path: Path) -> None:
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n- job_name: pretrain\n  static_configs:\n"
        f"  - targets: ['127.0.0.1:{live.port}', '127.0.0.1:{live.port + 1}']\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        results: dict[str, Any] = {}
        pending = set(dashboard_queries())
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            for expr in sorted(pending):
                q = expr.replace("$namespace", "default").replace("$job", "tiny-cpu")
                if expr.startswith("label_values("):
                    metric, label = expr[len("label_values(") : -1].rsplit(", ", 1)
                    url = f"http://127.0.0.1:{prom_port}/api/v1/series?" + urllib.parse.urlencode(
                        {"match[]": metric.replace("$namespace", "default")}
                    )
                    with contextlib.suppress(OSError):
                        data = json.loads(get(url))["data"]
                        if any(label in s for s in data):
                            results[expr] = data
                            pending.discard(expr)
                    continue
                url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
                try:
                    body = json.loads(get(url))
                except urllib.error.HTTPError as e:
                    pytest.fail(f"Prometheus rejected {q!r}: {e.read().decode()}")
                except OSError:
                    continue
                assert body["status"] == "success", (q, body)
                if body["data"]["result"]:
                    results[expr] = body["data"]["result"]
                    pending.discard(expr)
        assert not pending, f"no data for: {sorted(pending)}"
        loss = next(v for k, v in results.items() if k.startswith("pretrain_train_loss"))
        assert loss[0]["metric"]["pretrain_job"] == "tiny-cpu"
    finally:
        prom.terminate()
        prom.wait(timeout=30)
