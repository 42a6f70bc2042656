"""Pods as real containers: the operator's rendered pods run from the product's image with
podman (tests/containers.py), so that the image, the securityContext, the volumes and the env
are exercised exactly as rendered. The other system tests run pods as processes (fast); this
file is the one that runs a gang as containers.

The API emulator, the real `pretrain operator` process and kubectl as in tests/test_system.py;
the stand-in node in container mode; checkpoints to the S3 protocol server on loopback (the
containers share the host's network, as pod IPs are loopback addresses here)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pretrain.api.validation import parse_job
from pretrain.operator.children import build_configmap, build_pod
from tests.conftest import ROOT
from tests.images import Images
from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver, wait_for
from tests.kubeapi.server import ApiServer
from tests.kubelet import Kubelet
from tests.s3server import S3
from tests.test_system import secret_yaml
from tests.trainer_runs import free_port

pytestmark = [pytest.mark.podman, pytest.mark.slow]

JOB = "tiny-cpu"


def job_doc(bucket: str, image: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["model"].update({"layers": 2, "hidden": 64, "heads": 2})
    spec["resources"].update({"nodes": 2, "procsPerNode": 1, "image": image, "imagePullPolicy": "IfNotPresent",
                              "requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "3Gi"}})  # fmt: skip
    spec["training"].update({"maxSteps": 6, "evalInterval": 0, "evalSteps": 1, "logInterval": 1})
    spec["checkpoint"].update(
        {"uri": f"s3://{bucket}/{JOB}", "credentialsSecret": "s3-credentials", "intervalSteps": 3}
    )
    spec["monitoring"] = {"metricsPort": free_port()}
    spec["runPolicy"] = {"restartBackoffSeconds": 1, "maxRestarts": 0}
    return dict(doc)


class ContainerCluster:
    def __init__(self, api: ApiServer, root: Path, s3: S3, bucket: str, images: Images) -> None:
        self.api, self.root, self.s3, self.bucket, self.images = api, root, s3, bucket, images
        self.kubectl = Kubectl(api)
        self.operator = OperatorProcess(api, root / "operator.log", ["--progress-interval", "2"])
        self.node = Kubelet(api.kubeconfig, root / "node", runtime="podman")

    def pod(self, name: str) -> dict[str, Any]:
        return next((p for p in self.api.objects("pods") if p["metadata"]["name"] == name), {})

    def job(self) -> dict[str, Any]:
        jobs = self.api.objects("pretrainjobs", "pretrain.io")
        return jobs[0] if jobs else {}

    def diagnostics(self) -> str:
        logs = {
            p.parent.name: p.read_text(errors="replace")[-3000:] for p in (self.root / "node").glob("*/container.log")
        }
        return (f"job status: {(self.job().get('status') or {})}\noperator log:\n{self.operator.text()[-3000:]}\n"
                f"kubelet errors: {self.node.errors[-5:]}\ncontainer logs: {logs}")  # fmt: skip


@pytest.fixture
def cluster(s3: S3, tmp_path: Path, images: Images) -> Iterator[ContainerCluster]:
    api = start_apiserver(tmp_path / "api")
    c = ContainerCluster(api, tmp_path, s3, s3.bucket(f"ctr-{os.urandom(3).hex()}"), images)
    c.node.start()
    yield c
    c.operator.stop()
    c.node.stop()
    api.stop()


def test_a_gang_trains_as_containers_of_the_trainer_image(cluster: ContainerCluster) -> None:
    c = cluster
    c.operator.start()
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job_doc(c.bucket, c.images.trainer_cpu)))
    phase = lambda: (c.job().get("status") or {}).get("phase")  # noqa: E731
    wait_for(lambda: phase() in ("Succeeded", "Failed"), 600, "the job's end", c.diagnostics)
    assert phase() == "Succeeded", c.diagnostics()
    keys = [o["Key"] for o in c.s3.client().list_objects_v2(Bucket=c.bucket).get("Contents", [])]  # type: ignore[attr-defined]
    assert f"{JOB}/final/model.safetensors" in keys and f"{JOB}/step-00000006/manifest.json" in keys
    for rank in (0, 1):
        log = (c.root / "node" / f"{JOB}-a1-n{rank}" / "container.log").read_text()
        command = log.splitlines()[0]
        assert "--user 1000:1000 --group-add 1000 --read-only" in command, command
        assert "--cap-drop=ALL" in command and "no-new-privileges" in command
        assert c.images.trainer_cpu in command
    assert "step 6/6" in (c.root / "node" / f"{JOB}-a1-n0" / "container.log").read_text()


def rendered_pod(c: ContainerCluster) -> dict[str, Any]:
    """The operator's pod for the job, created directly (no owner: nothing collects it)."""
    job = parse_job(job_doc(c.bucket, c.images.trainer_cpu))
    config = build_configmap(job, "default", "uid-1")
    pod = build_pod(job, "default", "uid-1", 1, 0)
    for obj in (config, pod):
        obj["metadata"].pop("ownerReferences")
    c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(config))
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    return pod


def run_pod(c: ContainerCluster, pod: dict[str, Any], name: str, command: list[str] | None = None) -> None:
    pod = copy.deepcopy(pod)
    pod["metadata"]["name"] = name
    if command is not None:
        container = pod["spec"]["containers"][0]
        container["command"], container["args"] = command[:1], command[1:]
    c.kubectl("create", "-f", "-", stdin=yaml.safe_dump(pod))


def test_the_node_refuses_root_and_nothing_but_the_volumes_is_writable(cluster: ContainerCluster) -> None:
    c = cluster
    pod = rendered_pod(c)
    script = "id -u; echo ok > /workspace/x && echo ok > /tmp/x && echo ok > /dev/shm/x && echo written"
    run_pod(c, pod, "as-rendered", ["sh", "-c", script])

    root = copy.deepcopy(pod)
    root["spec"]["securityContext"]["runAsUser"] = 0  # the mutation: a pod asking for root
    run_pod(c, root, "asks-for-root", ["sh", "-c", "id -u"])
    run_pod(c, pod, "writes-outside", ["sh", "-c", "echo x > /opt/venv/x"])

    done = lambda name: (c.pod(name).get("status") or {}).get("phase") in ("Succeeded", "Failed")  # noqa: E731
    wait_for(lambda: done("as-rendered") and done("writes-outside"), 300, "both containers ended", c.diagnostics)
    assert c.pod("as-rendered")["status"]["phase"] == "Succeeded", c.diagnostics()
    assert (c.root / "node" / "as-rendered" / "container.log").read_text().splitlines()[1:] == ["1000", "written"]

    failed = c.pod("writes-outside")["status"]
    assert failed["phase"] == "Failed"
    term = failed["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] != 0 and "Read-only file system" in term["message"]

    waiting = wait_for(
        lambda: ((c.pod("asks-for-root").get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {}).get("waiting"),
        60, "root refused", c.diagnostics,
    )  # fmt: skip
    assert waiting["reason"] == "CreateContainerConfigError"
    assert "runAsUser breaks non-root policy" in waiting["message"]
    assert c.pod("asks-for-root")["status"]["phase"] == "Pending"
