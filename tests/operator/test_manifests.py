"""Every manifest the operator renders, for every example, is valid Kubernetes (strict schemas)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
from click.testing import CliRunner

from pretrain.api import load_job
from pretrain.cli import main
from pretrain.operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, master_addr
from pretrain.operator.planner import Observed, plan
from tests.conftest import EXAMPLES

KUBE_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def rendered(path: Path, *, prepared: bool = True) -> list[dict[str, Any]]:
    """What the first reconcile creates; with `prepared`, past a data preparation stage (or the
    stage's Job, where the example has one, without)."""
    job = load_job(path, check_backends=False)
    status = {"preparation": {"done": True}} if prepared else {}
    p = plan(job, name=job.metadata.name, namespace=job.metadata.namespace or "default", uid="0b0e0c0a-1111-2222-3333-444455556666",
             generation=1, status=status, observed=Observed(), now=datetime(2026, 1, 1))  # fmt: skip
    return p.create


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_objects_validate(path: Path, version: str) -> None:
    for obj in rendered(path) + [o for o in rendered(path, prepared=False) if o["kind"] == "Job"]:
        if obj["kind"] == "PodMonitor":
            continue  # a Prometheus Operator CRD: not in the core schemas (checked below)
        assert kv.validate(obj, version, strict=True) == version, obj["kind"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_pods_form_a_gang(path: Path) -> None:
    job = load_job(path, check_backends=False)
    objs = rendered(path)
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert len(pods) == job.spec.resources.nodes
    ns = job.metadata.namespace or "default"
    for rank, pod in enumerate(pods):
        name = pod["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63
        labels = pod["metadata"]["labels"]
        assert (
            labels[LABEL_JOB] == job.metadata.name and labels[LABEL_ATTEMPT] == "1" and labels[LABEL_RANK] == str(rank)
        )
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["hostname"] == name and spec["subdomain"] == job.metadata.name
        c = spec["containers"][0]
        assert c["command"] == ["torchrun"]
        assert "--node-rank=$(NODE_RANK)" in c["args"] and "--master-addr=$(PRETRAIN_MASTER_ADDR)" in c["args"]
        assert f"--nnodes={job.spec.resources.nodes}" in c["args"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NODE_RANK"] == str(rank)
        assert env["PRETRAIN_MASTER_ADDR"] == master_addr(job.metadata.name, ns, 1)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        if job.spec.resources.accelerator == "gpu":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == str(job.spec.resources.procs_per_node)
        else:
            assert "nvidia.com/gpu" not in str(c["resources"])
        if job.spec.checkpoint.credentials_secret:
            assert c["envFrom"] == [{"secretRef": {"name": job.spec.checkpoint.credentials_secret}}]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(job.spec.monitoring.metrics_port)
    svc = next(o for o in objs if o["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True


def test_placement_passes_through() -> None:
    path = next(p for p in EXAMPLES if p.name == "llama-1b-zero3.yaml")
    pod = next(o for o in rendered(path) if o["kind"] == "Pod")
    assert pod["spec"]["priorityClassName"] == "training-high"
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-research"
    pods = [o for o in rendered(path) if o["kind"] == "Pod"]
    # Kueue plain-pod gang: one group per attempt, every member says the group's size
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in pods} == {"llama-1b-a1"}
    assert {p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for p in pods} == {str(len(pods))}
    assert {p["metadata"]["annotations"]["kueue.x-k8s.io/retriable-in-group"] for p in pods} == {"false"}
    job = load_job(path, ["resources.schedulerName=volcano"], check_backends=False)
    p = plan(
        job,
        name="llama-1b",
        namespace="research",
        uid="u",
        generation=1,
        status={"preparation": {"done": True}},
        observed=Observed(),
        now=datetime(2026, 1, 1),
    )
    assert next(o for o in p.create if o["kind"] == "Pod")["spec"]["schedulerName"] == "volcano"


def test_render_command_prints_valid_yaml() -> None:
    import yaml

    result = CliRunner().invoke(main, ["render", str(EXAMPLES[0]), "--set", "resources.nodes=1"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs][:2] == ["Service", "ConfigMap"]


def test_kueue_places_the_gang_within_one_topology_domain() -> None:
    """Issue 29 item 4: resources.topology becomes Kueue's TAS annotation on every pod of the
    gang's pod group; without a Kueue queue it is refused in one line (nothing would honour it)."""
    from pretrain.api.validation import SpecError

    path = next(p for p in EXAMPLES if p.name == "llama-1b-zero3.yaml")
    for mode, key in (("required", "podset-required-topology"), ("preferred", "podset-preferred-topology")):
        job = load_job(path, ["resources.topology.level=cloud.provider.com/topology-rack",
                              f"resources.topology.mode={mode}"], check_backends=False)  # fmt: skip
        p = plan(job, name="llama-1b", namespace="research", uid="u", generation=1,
                 status={"preparation": {"done": True}}, observed=Observed(), now=datetime(2026, 1, 1))  # fmt: skip
        pods = [o for o in p.create if o["kind"] == "Pod"]
        assert len(pods) > 1 and {o["metadata"]["annotations"][f"kueue.x-k8s.io/{key}"] for o in pods} == {
            "cloud.provider.com/topology-rack"}  # fmt: skip
        for o in pods:
            kv.validate(o, "1.35", strict=True)
    with pytest.raises(SpecError, match=r"spec.resources.topology: .* set spec.resources.queueName"):
        load_job(path, ["resources.queueName=null", "resources.topology.level=rack"], check_backends=False)
    with pytest.raises(SpecError, match=r"spec.resources.topology: Kueue's topology placement; Volcano places"):
        load_job(path, ["resources.schedulerName=volcano", "resources.topology.level=rack"], check_backends=False)
