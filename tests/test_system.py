"""System test: the operator's own pods, run for real by a stand-in kubelet, train together.

The operator (Kopf handlers over the in-memory cluster) creates the Service, ConfigMap and two
pods for examples/tiny-cpu.yaml with resources.nodes: 2; tests/kubelet.py runs each pod's
torchrun command as a local process group; the two torchrun agents rendezvous on node 0 and
train one model, checkpointing to a real S3 protocol server.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.kubelet import LocalKubelet, Loop
from tests.operator.harness import Harness
from tests.s3server import S3
from tests.trainer_runs import free_port

pytestmark = pytest.mark.slow

STEPS = 40


def job_doc(bucket: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["resources"].update({"nodes": 2, "procsPerNode": 1})
    spec["training"].update({"maxSteps": STEPS, "evalInterval": 20, "logInterval": 5})
    spec["checkpoint"].update(
        {"uri": f"s3://{bucket}/tiny-cpu", "credentialsSecret": "s3-credentials", "intervalSteps": 10}
    )
    spec["monitoring"] = {"metricsPort": free_port()}
    spec["runPolicy"] = {"restartBackoffSeconds": 1, "maxRestarts": 2}
    doc["metadata"] = {"name": "tiny-cpu", "namespace": "default", "uid": "uid-tiny-cpu", "generation": 1}
    return doc


class System:
    def __init__(self, s3: S3, root: Path, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self.h = Harness(job_doc(bucket))
        self.h.cluster.objects[("Secret", "default", "s3-credentials")] = {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s3-credentials", "namespace": "default"}, "stringData": dict(s3.env),
        }  # fmt: skip
        self.kubelet = LocalKubelet(self.h.cluster, root, grace_seconds=60)
        self.progress_seen: list[dict[str, Any]] = []
        self.pods_seen: set[str] = set()
        self._last_progress = 0.0

    def step(self) -> None:
        self.h.cluster.now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # real time here
        self.h.reconcile()
        self.kubelet.sync()
        self.pods_seen |= {p["metadata"]["name"] for p in self.h.cluster.pods()}
        if time.monotonic() - self._last_progress > 2:
            self._last_progress = time.monotonic()
            self.h.progress()
            if "progress" in self.h.status:
                self.progress_seen.append(copy.deepcopy(self.h.status["progress"]))

    def wait(self, loop: Loop, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert loop.error is None, loop.error
            if predicate():
                return
            time.sleep(0.5)
        logs = {p.parent.name: p.read_text(errors="replace")[-2500:] for p in self.kubelet.root.glob("*/container.log")}
        raise AssertionError(f"timed out waiting for {what}; status {json.dumps(self.h.status)[:1500]}; logs {logs}")

    def keys(self, prefix: str) -> list[str]:
        resp = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[attr-defined]
        return [o["Key"] for o in resp.get("Contents", [])]


@pytest.fixture
def system(s3: S3, tmp_path: Path) -> Iterator[System]:
    bucket = s3.bucket(f"sys-{os.urandom(3).hex()}")
    sys_ = System(s3, tmp_path, bucket)
    yield sys_
    sys_.kubelet.stop()


def test_two_pods_train_together_to_success(system: System) -> None:
    with Loop(system.step) as loop:
        system.wait(loop, lambda: system.h.phase == "Succeeded", 300, "Succeeded")
    kinds = {k for k, _, _ in system.h.cluster.objects}
    assert {"Service", "ConfigMap"} <= kinds
    assert system.pods_seen == {"tiny-cpu-a1-n0", "tiny-cpu-a1-n1"}
    assert system.h.status["restarts"] == 0
    assert any("step" in p and "loss" in p for p in system.progress_seen), system.progress_seen
    assert "tiny-cpu/final/model.safetensors" in system.keys("tiny-cpu/final/")
    node0 = (system.kubelet.root / "tiny-cpu-a1-n0" / "container.log").read_text()
    assert "2 processes" in node0 and f"step {STEPS}/{STEPS}" in node0


def test_sigkill_after_a_checkpoint_gang_restarts_and_resumes(system: System) -> None:
    with Loop(system.step) as loop:
        system.wait(loop, lambda: "tiny-cpu/step-00000010/manifest.json" in system.keys("tiny-cpu/step-"), 240,
                    "the first checkpoint")  # fmt: skip
        system.kubelet.kill("tiny-cpu-a1-n1")
        system.wait(loop, lambda: system.h.phase == "Succeeded", 300, "Succeeded after a restart")
    assert system.h.status["restarts"] == 1 and system.h.status["attempt"] == 2
    log = (system.kubelet.root / "tiny-cpu-a2-n0" / "container.log").read_text()
    resumed = [ln for ln in log.splitlines() if "resumed from s3://" in ln]
    assert resumed, log[-3000:]
    step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    assert step >= 10 and step % 10 == 0
    train_log = system.kubelet.root / "tiny-cpu-a2-n0" / "workspace" / "train_log.jsonl"
    steps = [json.loads(x)["step"] for x in train_log.read_text().splitlines() if '"loss"' in x]
    assert steps[0] == step + 1 and steps[-1] == STEPS, "the step count continues from the checkpoint"
    assert "GangRestart" in system.h.events()
