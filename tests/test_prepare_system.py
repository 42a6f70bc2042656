"""System test of the data preparation stage (issue 28 item 1): `kubectl apply` of a job with
data.prepare, through the API emulator, the real operator process, the stand-in Job controller
and node, and moto S3. The corpus is six files in the bucket; three workers prepare it into
data.cacheUri, one is killed mid-way and only its index runs again, the last to finish commits,
and the trainer streams the dataset from the bucket; a second job with the same data goes
straight to its gang."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.jobcontroller import JobController
from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver, wait_for
from tests.kubelet import Kubelet
from tests.s3server import S3
from tests.test_system import secret_yaml
from tests.trainer_runs import free_port

pytestmark = pytest.mark.slow

CORPUS = (ROOT / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt").read_text()


def job_yaml(name: str, bucket: str) -> str:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["data"].update({"sources": [{"uri": f"s3://{bucket}/corpus/*.txt"}], "cacheUri": f"s3://{bucket}/cache",
                         "prepare": {"workers": 3, "backoffLimitPerIndex": 2}})  # fmt: skip
    spec["resources"].update({"nodes": 1, "procsPerNode": 1})
    spec["training"].update({"maxSteps": 4, "globalBatchSize": 8, "microBatchSize": 8, "evalInterval": 0})
    spec["checkpoint"].update({"uri": f"s3://{bucket}/{name}", "credentialsSecret": "s3-credentials"})
    spec["monitoring"] = {"metricsPort": free_port()}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def stack(s3: S3, tmp_path: Path) -> Iterator[tuple[Any, Kubectl, Kubelet, JobController]]:
    api = start_apiserver(tmp_path / "api")
    operator = OperatorProcess(api, tmp_path / "operator.log", ["--progress-interval", "2"]).start()
    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    jobs = JobController(api.kubeconfig, backoff_seconds=1.0).start()
    yield api, Kubectl(api), node, jobs
    jobs.stop()
    node.stop()
    operator.stop()
    api.stop()


def test_a_job_prepares_its_data_in_parallel_then_trains(stack: Any, s3: S3, tmp_path: Path) -> None:
    api, kubectl, node, controller = stack
    bucket = s3.bucket(f"prep-{os.urandom(3).hex()}")
    lines = CORPUS.splitlines(keepends=True)
    for k in range(6):  # six files: six units of work
        s3.client().put_object(Bucket=bucket, Key=f"corpus/part-{k}.txt", Body="".join(lines[k::6]).encode())  # type: ignore[attr-defined]

    def status(name: str) -> dict[str, Any]:
        return next((j.get("status") or {} for j in api.objects("pretrainjobs", "pretrain.io")
                     if j["metadata"]["name"] == name), {})  # fmt: skip

    def diagnostics() -> str:
        logs = {
            p.parent.name: p.read_text(errors="replace")[-1500:] for p in (tmp_path / "node").glob("*/container.log")
        }
        return (f"{[(j['metadata']['name'], j.get('status')) for j in api.objects('pretrainjobs', 'pretrain.io')]}\n"
                f"jobs: {[j.get('status') for j in api.objects('jobs', 'batch')]}\n{controller.errors[-3:]}\n"
                f"{json.dumps(logs)[:6000]}")  # fmt: skip

    kubectl("apply", "-f", "-", stdin=secret_yaml(s3))
    kubectl("apply", "-f", "-", stdin=job_yaml("first", bucket))
    wait_for(lambda: status("first").get("phase") == "Preparing", 30, "Preparing", diagnostics)
    assert "PREPARING" in kubectl("get", "ptj", "first").stdout.upper()
    # kill index 1's pod while it runs: only that index runs again
    victim = wait_for(lambda: next((p["metadata"]["name"] for p in api.objects("pods")
                                    if p["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index")
                                    == "1" and p["status"].get("phase") == "Running"), None), 30, "index 1 running")  # fmt: skip
    node.kill(victim)
    wait_for(lambda: status("first").get("phase") == "Running", 180, "Running after the preparation", diagnostics)
    prepared = status("first")["preparation"]
    assert prepared["done"] is True and prepared["workers"] == 3, prepared
    ran = sorted(d.name.rsplit("-", 2)[1] for d in (tmp_path / "node").glob("first-prepare-*"))
    assert ran == ["0", "1", "1", "2"], f"index 1 twice, the others once: {ran}"
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "node").glob("first-prepare-*/container.log"))
    assert logs.count("committed, ") == 1, "one commit, by the last worker to finish"
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="cache/")["Contents"]]  # type: ignore[attr-defined]
    manifest_key = next(k for k in keys if k.endswith("/manifest.json") and "/parts/" not in k)
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=manifest_key)["Body"].read())  # type: ignore[attr-defined]
    assert (manifest["units"], manifest["parts"]) == (6, 3)
    total = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert 0 < prepared["tokens"] <= total and prepared["units"] <= 6, (prepared, total)  # as the workers' pods told

    # the same rows as one machine preparing it at once
    from click.testing import CliRunner

    from pretrain.cli import main

    doc = yaml.safe_load(job_yaml("first", bucket))
    del doc["spec"]["data"]["cacheUri"], doc["spec"]["data"]["prepare"]
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(main, ["data", "prepare", str(tmp_path / "local.yaml"), "--output", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    assert json.loads(next((tmp_path / "one").glob("*/manifest.json")).read_text())["splits"] == manifest["splits"]

    wait_for(lambda: status("first").get("phase") == "Succeeded", 240, "Succeeded", diagnostics)
    node0 = tmp_path / "node" / "first-a1-n0"
    log0 = (node0 / "container.log").read_text(errors="replace")
    assert f"dataset s3://{bucket}/cache/{manifest['fingerprint']} is prepared: streaming it" in log0, log0[-3000:]
    assert list(node0.glob("workspace/stream/rank-0/train/*.bin")), "blocks came through the node-local cache"
    assert not list(node0.glob("workspace/data/*/manifest.json")), "no node holds a copy of the dataset"
    assert api.objects("jobs", "batch") == [], "the preparation Job was deleted once done"

    # a second job with the same data goes straight to its gang: no preparation stage
    kubectl("apply", "-f", "-", stdin=job_yaml("second", bucket))
    wait_for(lambda: status("second").get("phase") in ("Running", "Succeeded"), 120, "second Running", diagnostics)
    assert status("second")["preparation"]["reusedFrom"] == "first"
    assert not list((tmp_path / "node").glob("second-prepare-*")), "no worker of a second stage ran"
    log1 = tmp_path / "node" / "second-a1-n0" / "container.log"
    streaming = f"dataset s3://{bucket}/cache/{manifest['fingerprint']} is prepared: streaming it"
    wait_for(
        lambda: log1.is_file() and streaming in log1.read_text(errors="replace"), 120, "second streams", diagnostics
    )
