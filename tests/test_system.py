"""System test: everything a cluster user meets, with real processes everywhere.

The API emulator (tests/kubeapi) serves the Kubernetes API over HTTP; `pretrain operator` (the
chart's command: Kopf and the `kubernetes` client) runs in a process of its own against it; the
real kubectl v1.35 applies, reads, describes and deletes the job; the stand-in node
(tests/kubelet.py) binds and runs the operator's pods as local process trees through the API; the
two torchrun agents rendezvous and train one model, checkpointing to a real S3 protocol server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pretrain.metrics.history import current_records, parse_history
from tests.conftest import ROOT
from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver, wait_for
from tests.kubeapi.server import ApiServer
from tests.kubelet import Kubelet
from tests.s3server import S3
from tests.trainer_runs import free_port

pytestmark = pytest.mark.slow

STEPS = 40
JOB = "tiny-cpu"


def job_yaml(bucket: str) -> str:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["resources"].update({"nodes": 2, "procsPerNode": 1})
    spec["training"].update({"maxSteps": STEPS, "evalInterval": 20, "logInterval": 5})
    spec["checkpoint"].update(
        {"uri": f"s3://{bucket}/{JOB}", "credentialsSecret": "s3-credentials", "intervalSteps": 10}
    )
    spec["monitoring"] = {"metricsPort": free_port()}
    spec["runPolicy"] = {"restartBackoffSeconds": 1, "maxRestarts": 2}
    return yaml.safe_dump(doc, sort_keys=False)


def secret_yaml(s3: S3) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                           "type": "Opaque", "stringData": dict(s3.env)})  # fmt: skip


class Cluster:
    def __init__(self, api: ApiServer, root: Path, s3: S3, bucket: str) -> None:
        self.api, self.root, self.s3, self.bucket = api, root, s3, bucket
        self.kubectl = Kubectl(api)
        self.operator = OperatorProcess(api, root / "operator.log", ["--progress-interval", "2"])
        self.node = Kubelet(api.kubeconfig, root / "node")

    def job(self) -> dict[str, Any]:
        jobs = self.api.objects("pretrainjobs", "pretrain.io")
        return jobs[0] if jobs else {}

    def status(self) -> dict[str, Any]:
        return dict(self.job().get("status") or {})

    def table(self) -> dict[str, str]:
        """`kubectl get ptj` as the user reads it: column name -> cell."""
        header, row = self.kubectl("get", "ptj", JOB).stdout.splitlines()[:2]
        starts = [m.start() for m in re.finditer(r"\S+", header)]  # cells are aligned under their headings
        ends = [*starts[1:], None]
        return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}

    def keys(self, prefix: str) -> list[str]:
        resp = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[attr-defined]
        return [o["Key"] for o in resp.get("Contents", [])]

    def diagnostics(self) -> str:
        logs = {
            p.parent.name: p.read_text(errors="replace")[-2000:] for p in (self.root / "node").glob("*/container.log")
        }
        return (f"status: {json.dumps(self.status())[:2000]}\noperator log:\n{self.operator.text()[-4000:]}\n"
                f"kubelet errors: {self.node.errors[-5:]}\npods: {[p['metadata']['name'] for p in self.api.objects('pods')]}\n"
                f"container logs: {json.dumps(logs)[:6000]}")  # fmt: skip


@pytest.fixture
def cluster(s3: S3, tmp_path: Path) -> Iterator[Cluster]:
    api = start_apiserver(tmp_path / "api")
    c = Cluster(api, tmp_path, s3, s3.bucket(f"sys-{os.urandom(3).hex()}"))
    c.operator.start()
    c.node.start()
    yield c
    c.operator.stop()
    c.node.stop()
    api.stop()


def test_kubectl_apply_to_success_through_a_gang_restart_and_an_operator_crash(cluster: Cluster) -> None:
    c = cluster
    wait = lambda pred, timeout, what: wait_for(pred, timeout, what, c.diagnostics)  # noqa: E731
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    assert "pretrainjob.pretrain.io/tiny-cpu created" in c.kubectl("apply", "-f", "-", stdin=job_yaml(c.bucket)).stdout

    # the operator creates the children; the node runs both pods; they train together
    wait(lambda: c.status().get("phase") == "Running", 120, "phase Running")
    names = lambda kind: sorted(o["metadata"]["name"] for o in c.api.objects(kind))  # noqa: E731
    assert names("services") == [JOB] and names("configmaps") == [f"{JOB}-config"]
    assert names("pods") == [f"{JOB}-a1-n0", f"{JOB}-a1-n1"]
    uid = c.job()["metadata"]["uid"]
    for kind in ("services", "configmaps", "pods"):
        for o in c.api.objects(kind):
            assert [r["uid"] for r in o["metadata"]["ownerReferences"]] == [uid], "owned by the job"

    # kubectl get ptj shows the running job's progress, scraped from node 0's metrics endpoint
    row = wait(lambda: (lambda r: r if r["STEP"] not in ("", "0") else None)(c.table()), 120, "Step in kubectl get ptj")
    assert row["PHASE"] == "Running" and int(row["STEP"]) > 0 and float(row["LOSS"]) > 0 and float(row["TOKENS/S"]) > 0
    assert row["RESTARTS"] == "0"
    # kubectl logs reaches the node's kubelet through the API (pods/log): rank 0's own lines
    logs = c.kubectl("logs", f"{JOB}-a1-n0").stdout
    assert f"job {JOB}: gpt2" in logs and "[rank 0]" in logs, logs[-2000:]

    # SIGKILL one pod after the first checkpoint: the whole gang restarts and resumes from it
    wait(lambda: f"{JOB}/step-00000010/manifest.json" in c.keys(f"{JOB}/step-"), 240, "the first checkpoint")
    c.node.kill(f"{JOB}-a1-n1")
    wait(lambda: c.status().get("attempt") == 2 and c.status().get("phase") == "Running", 120, "attempt 2 running")
    assert c.status()["restarts"] == 1
    assert wait(lambda: c.table()["RESTARTS"] == "1", 30, "Restarts 1 in kubectl get ptj")

    # kill -9 the operator mid-job and start it again: it adopts the running attempt
    c.operator.kill(signal.SIGKILL)
    time.sleep(2)
    c.operator.start()
    wait(lambda: c.status().get("phase") == "Succeeded", 300, "Succeeded")
    status = c.status()
    assert (status["restarts"], status["attempt"]) == (1, 2), "the restart count survives the operator's crash"
    assert (status["progress"]["step"], status["progress"]["percent"]) == (STEPS, 100.0), (
        "the final step, not the last scrape"
    )
    assert status["lastCheckpoint"]["uri"] == f"s3://{c.bucket}/{JOB}/step-{STEPS:08d}"
    assert set(c.node.ips) == {f"{JOB}-a1-n0", f"{JOB}-a1-n1", f"{JOB}-a2-n0", f"{JOB}-a2-n1"}, "no duplicate pods"
    assert f"{JOB}/final/model.safetensors" in c.keys(f"{JOB}/final/")
    log = (c.root / "node" / f"{JOB}-a2-n0" / "container.log").read_text()
    resumed = [ln for ln in log.splitlines() if "resumed from s3://" in ln]
    assert resumed, log[-3000:]
    step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    assert step >= 10 and step % 10 == 0
    train_log = c.root / "node" / f"{JOB}-a2-n0" / "workspace" / "train_log.jsonl"
    steps = [json.loads(x)["step"] for x in train_log.read_text().splitlines() if '"loss"' in x]
    assert steps[0] == step + 1 and steps[-1] == STEPS, "the step count continues from the checkpoint"
    # the run's history in the bucket: both attempts, the second superseding what followed its checkpoint
    raw = c.s3.client().get_object(Bucket=c.bucket, Key=f"{JOB}/metrics.jsonl")["Body"].read().decode()  # type: ignore[attr-defined]
    history = current_records(parse_history(raw))
    starts = [(r["attempt"], r["step"]) for r in history if r.get("event") == "start"]
    assert starts == [(1, 0), (2, step)], starts
    logged = [r["step"] for r in history if "loss" in r]
    assert logged == sorted(logged) and logged[-1] == STEPS and any(r.get("event") == "checkpoint" for r in history)
    described = c.kubectl("describe", "ptj", JOB).stdout
    assert re.search(r"^\s+Phase:\s+Succeeded$", described, re.M), described
    events = described.split("\nEvents:", 1)[1]
    assert "GangRestart" in events and "Completed" in events, events

    # kubectl delete: the operator's finalizer is released, the garbage collector takes every child
    c.kubectl("delete", "ptj", JOB, timeout=60)
    assert c.api.objects("pretrainjobs", "pretrain.io") == [], "no finalizer left holding the job"
    wait(lambda: not any(c.api.objects(k) for k in ("pods", "services", "configmaps")), 60, "every child gone")


def test_two_jobs_side_by_side_on_one_node_each_with_its_own_pod_ip(cluster: Cluster) -> None:
    """Issue 27: on one shared host network the stand-in node gave every gang the same
    rendezvous port, which hid that two jobs on one node clash. Each pod has its own IP and each
    gang its own rendezvous; both jobs bind the same metrics port, each on its pod's IP."""
    c = cluster
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    port = free_port()
    for name in ("left", "right"):
        doc = yaml.safe_load(job_yaml(c.bucket))
        doc["metadata"]["name"] = name
        doc["spec"]["resources"].update({"nodes": 1, "procsPerNode": 1})
        doc["spec"]["training"].update({"maxSteps": 6, "globalBatchSize": 8, "microBatchSize": 8, "evalInterval": 0})
        doc["spec"]["checkpoint"]["uri"] = f"s3://{c.bucket}/{name}"
        doc["spec"]["monitoring"] = {"metricsPort": port}
        c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))

    def phases() -> dict[str, str]:
        return {j["metadata"]["name"]: (j.get("status") or {}).get("phase", "") for j in
                c.api.objects("pretrainjobs", "pretrain.io")}  # fmt: skip

    wait_for(lambda: phases() == {"left": "Succeeded", "right": "Succeeded"}, 420, "both jobs Succeeded",
             lambda: f"{phases()}\n{c.diagnostics()}")  # fmt: skip
    ips = {p["metadata"]["name"]: p["status"].get("podIP") for p in c.api.objects("pods")}
    assert ips["left-a1-n0"] != ips["right-a1-n0"] and all(ips.values()), ips
    assert all((j.get("status") or {}).get("restarts", 0) == 0 for j in c.api.objects("pretrainjobs", "pretrain.io"))
