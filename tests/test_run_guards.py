"""`pretrain run` guards a run's folders and its lineage (issue 16: data loss and corruption).

Real runs through torchrun (the smallest model): two runs of one job at once, kill -9 of the
launcher, a failed first run's leftovers, and `resume: never` beside an earlier run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from pretrain.storage.checkpoint import CheckpointStore
from pretrain.storage.lease import LEASE_FILE
from tests.conftest import subprocess_env
from tests.s3server import S3
from tests.test_trainer import _wait_for_step
from tests.trainer_runs import command, run_job

pytestmark = pytest.mark.slow  # torchrun: not in `make test-fast`

SLOW = ["model.hidden=128", "model.heads=4", "model.intermediate=256", "model.maxPositions=256",
        "data.sequenceLength=256", "training.maxSteps=400", "checkpoint.intervalSteps=2"]  # fmt: skip


def processes_of(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line names `folder` (the launcher, torchrun, the workers)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(folder) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_one_run_per_folder_and_no_orphans_after_kill_9(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    first = subprocess.Popen(command(out, SLOW), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=subprocess_env(out), cwd=out)  # fmt: skip
    try:
        _wait_for_step(out / "work" / "train_log.jsonl", 3, first)
        second = run_job(out, SLOW, timeout=120)
        assert second.proc.returncode == 1, second.output[-2000:]
        last = second.proc.stderr.strip().splitlines()[-1]
        assert "is in use by another `pretrain run` (pid" in last and last.startswith("error: "), last
        assert first.poll() is None, "the running job is untouched"
        assert len(processes_of(out)) >= 3, "launcher, torchrun and workers"
        os.kill(first.pid, signal.SIGKILL)  # the launcher alone, as an OOM killer or a closed terminal would
        first.wait(10)
        deadline = time.monotonic() + 120
        while processes_of(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_of(out) == [], "torchrun and its workers stop with the launcher"
    finally:
        if first.poll() is None:
            first.kill()
        for p in processes_of(out):
            p.kill()
    saved = sorted(int(p.parent.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*/manifest.json"))
    assert saved, "the killed run's workers saved checkpoints"
    logged = [json.loads(line)["step"] for line in (out / "work" / "train_log.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert saved[-1] == logged[-1], "issue 33 item 7: torchrun's SIGTERM after kill -9 saves the last step"
    third = run_job(out, [*SLOW[:-2], f"training.maxSteps={saved[-1] + 2}", "checkpoint.intervalSteps=2"])
    assert third.proc.returncode == 0, third.output[-3000:]
    assert f"(step {saved[-1]})" in third.output, "the killed run's last checkpoint is taken up"


def test_a_failed_first_run_leaves_nothing_the_next_one_trusts(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ckpt = tmp_path / "ckpt"
    chars = ["tokenizer.type=chars", f"checkpoint.uri={ckpt}"]
    failed = run_job(tmp_path / "first", [*chars, f"data.sources.0.uri={empty}"])
    assert failed.proc.returncode == 1
    last = failed.proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "empty.txt: too little text" in last, "the trainer's own reason, last"
    vocab = json.loads((ckpt / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= 4, "the failed run left a tokenizer of specials only"
    good = run_job(tmp_path / "second", [*chars, "training.maxSteps=4"])
    assert good.proc.returncode == 0, good.output[-3000:]
    vocab = json.loads((ckpt / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) > 30, "rebuilt from this run's corpus, not reused"

    # resume: never beside those checkpoints is refused; nothing is deleted
    before = sorted(p.name for p in ckpt.iterdir())
    fresh = run_job(tmp_path / "third", [*chars, "training.maxSteps=4", "checkpoint.resume=never"])
    assert fresh.proc.returncode == 1
    last = fresh.proc.stderr.strip().splitlines()[-1]
    assert "holds checkpoints of an earlier run (steps 4)" in fresh.output, fresh.output[-2000:]
    assert last.startswith("error: "), last
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_two_runs_on_one_remote_checkpoint_uri(tmp_path: Path, s3: S3) -> None:
    """Two runs on two machines would name one bucket prefix; the flock cannot see that, the
    checkpoint lease does. A restart of the same run takes its lease over at once."""
    uri = f"s3://{s3.bucket(f'shared-{os.urandom(3).hex()}')}/job"
    first_out, other_out = tmp_path / "first", tmp_path / "other"
    first_out.mkdir()
    first = subprocess.Popen(command(first_out, [*SLOW, f"checkpoint.uri={uri}"]), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=subprocess_env(first_out), cwd=first_out,
                             start_new_session=True)  # fmt: skip
    try:
        _wait_for_step(first_out / "work" / "train_log.jsonl", 3, first)
        other = run_job(other_out, [*SLOW, f"checkpoint.uri={uri}"], timeout=120)
        assert other.proc.returncode == 1, other.output[-2000:]
        last = other.proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint.uri {uri} is in use by another run: held by local run "), last
        assert f"{first_out / 'work'}" in last and "two runs must not share a checkpoint folder" in last, last
        assert not other.log, "the refused run trained no step"
        assert first.poll() is None, "the first run goes on"
        os.killpg(first.pid, signal.SIGKILL)  # the whole tree: nothing releases the lease
        first.wait(10)
        deadline = time.monotonic() + 60
        while processes_of(first_out) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    store = CheckpointStore(uri, workdir=tmp_path / "inspect")
    assert store.exists(LEASE_FILE), "kill -9 left the lease behind"
    saved = store.complete_steps()
    assert saved
    again = run_job(first_out, [*SLOW[:-2], f"training.maxSteps={saved[-1] + 2}", "checkpoint.intervalSteps=2",
                                f"checkpoint.uri={uri}"])  # fmt: skip
    assert again.proc.returncode == 0, again.output[-3000:]
    assert f"(step {saved[-1]})" in again.output, "the same run takes its own lease over and resumes at once"
    assert not store.exists(LEASE_FILE), "a finished run releases the lease"


def test_a_trainer_serves_the_storage_call_it_retries_before_its_first_step(tmp_path: Path) -> None:
    """Issue 27 item 7: with a checkpoint endpoint that does not answer, a trainer retries for
    about two minutes before it gives up, and served no metrics meanwhile (its endpoint opened
    after setup), so the operator saw only pods that run. Now the endpoint is up from the start
    and says which call is retried, and why; there is no step until setup is done."""
    from pretrain.operator.progress import parse_metrics, progress_from
    from tests.trainer_runs import free_port

    port = free_port()
    env = {**subprocess_env(tmp_path), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # fmt: skip
    cmd = command(tmp_path / "run", ["checkpoint.uri=s3://bucket/ck", f"monitoring.metricsPort={port}"], nproc=1)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        def retrying() -> dict[str, object] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    samples = parse_metrics(r.read().decode())
            except OSError:
                return None
            assert "pretrain_step" not in samples, "no step before setup is done"
            return progress_from(samples, datetime.now(UTC))[0].get("storageRetrying")

        deadline = time.monotonic() + 120
        while (seen := retrying()) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert seen is not None, "the retried call was never served"
        assert seen["operation"] == "take the checkpoint lease" and "Could not connect" in str(seen["error"]), seen
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
