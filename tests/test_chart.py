"""The Helm chart, through the real helm v4 binary: lint, template, strict Kubernetes schemas,
the CRD in sync, and RBAC equal to what the operator's code calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

from pretrain.operator.informer import WATCHED, WATCHED_NODES
from tests.conftest import ROOT
from tests.operator.harness import Harness, job_body

CHART = ROOT / "charts" / "pretrain-operator"
HELM = shutil.which("helm") or str(ROOT / ".cache" / "k8s-bin" / "helm")
KUBE_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
VALUES = {"default": [], "ci-values": ["-f", str(CHART / "ci-values.yaml")]}

pytestmark = pytest.mark.skipif(not Path(HELM).exists(), reason="needs helm: `make tools` fetches it")


def helm(*args: str) -> str:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def template(values: list[str], version: str = "1.33.0") -> list[dict[str, Any]]:
    out = helm("template", "ptr", str(CHART), "--namespace", "pretrain-system", "--kube-version", version,
               "--include-crds", *values)  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("name", VALUES)
def test_lint_strict(name: str) -> None:
    helm("lint", "--strict", str(CHART), *VALUES[name])


@pytest.mark.parametrize("name", VALUES)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_objects_validate(name: str, version: str) -> None:
    objs = template(VALUES[name], f"{version}.0")
    kinds = {o["kind"] for o in objs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service", "ConfigMap"} <= kinds
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"  # a Prometheus Operator CRD
            continue
        assert kv.validate(obj, version, strict=True) == version, obj["kind"]


def test_bad_values_are_refused_by_the_schema() -> None:
    proc = subprocess.run(
        [HELM, "template", "x", str(CHART), "--set", "logLevel=loud"], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "logLevel" in proc.stderr


def test_chart_crd_is_the_generated_one() -> None:
    assert (CHART / "crds" / "pretrainjob.yaml").read_text() == (ROOT / "crds" / "pretrainjob.yaml").read_text()


def test_deployment_hardening_and_values() -> None:
    objs = template(VALUES["ci-values"])
    dep = next(o for o in objs if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["image"] == "registry.example.com/ml/pretrain-operator:0.1.0-rc1"
    assert "--namespace=research" in c["args"] and "--log-level=debug" in c["args"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["tolerations"][0]["key"] == "dedicated"
    roles = [o for o in objs if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["pretrain-system", "prod-training", "research"]
    assert not [o for o in objs if o["kind"] == "ClusterRole"]
    dash = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard"))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "pretrain-jobs"' in dash["data"]["pretrain.json"]


RESOURCE = {"Pod": ("", "pods"), "Service": ("", "services"), "ConfigMap": ("", "configmaps"),
            "Event": ("", "events"), "PodMonitor": ("monitoring.coreos.com", "podmonitors"),
            "PretrainJob": ("pretrain.io", "pretrainjobs"), "PretrainJob/status": ("pretrain.io", "pretrainjobs/status"),
            "Job": ("batch", "jobs"), "PodGroup": ("scheduling.volcano.sh", "podgroups")}  # fmt: skip
#: What Kopf itself does (watch the jobs), what the children's caches do (list and watch pods,
#: services and configmaps), and the permission blockOwnerDeletion needs; cluster-wide, Kopf
#: also discovers namespaces and CRDs.
KOPF_JOB_RULES = {
    ("pretrain.io", "pretrainjobs"): {"list", "watch"},
    ("pretrain.io", "pretrainjobs/finalizers"): {"update"},
    **{(group, resource): set(verbs) for group, resource, verbs in WATCHED},
}
KOPF_CLUSTER_RULES = {
    ("", "namespaces"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


def calls_made_by_the_operator() -> dict[tuple[str, str], set[str]]:
    """Run every lifecycle path over the in-memory cluster and collect the API calls it made."""
    h = Harness(job_body({"resources.nodes": 2, "resources.procsPerNode": 1, "checkpoint.uri": "s3://b/c",
                          "monitoring.podMonitor": True, "runPolicy.restartBackoffSeconds": 0,
                          "runPolicy.ttlSecondsAfterFinished": 0}))  # fmt: skip
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1)
    h.reconcile()
    h.cluster.settle()
    h.reconcile()
    h.body["spec"]["training"]["logInterval"] = 3
    h.reconcile()
    h.finish_all()
    h.reconcile()
    h.reconcile()
    stuck = Harness(job_body({"runPolicy.schedulingTimeoutSeconds": 1, "runPolicy.schedulingTimeoutAction": "Suspend"}))
    stuck.reconcile()
    stuck.advance(2)
    stuck.reconcile()  # sets spec.runPolicy.suspend
    prepared = Harness(job_body({"data.prepare": {"workers": 2}, "data.cacheUri": "s3://b/cache"}))
    prepared.reconcile()  # creates the preparation Job
    prepared.cluster.set_job_status("tiny-prepare", complete=True, succeeded=2)
    prepared.reconcile()  # reads it, deletes it, starts the gang
    volcano = Harness(job_body({"resources.schedulerName": "volcano", "runPolicy.restartBackoffSeconds": 0}))
    volcano.reconcile()  # creates attempt 1's PodGroup
    volcano.run_all()
    volcano.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1)
    volcano.reconcile()
    volcano.cluster.settle()
    volcano.reconcile()  # deletes it, creates attempt 2's
    rules: dict[tuple[str, str], set[str]] = {}
    for verb, kind in h.cluster.calls + stuck.cluster.calls + prepared.cluster.calls + volcano.cluster.calls:
        rules.setdefault(RESOURCE[kind], set()).add(verb)
    return rules


LEADER_ELECTION_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def rbac_rules(objs: list[dict[str, Any]], kind: str, leader: bool = False) -> dict[tuple[str, str], set[str]]:
    """The rules of every `kind` (the leader-election Role's alone with `leader`)."""
    out: dict[tuple[str, str], set[str]] = {}
    for role in (o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith("-leader-election") == leader):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def test_rbac_grants_exactly_what_the_operator_calls() -> None:
    from pretrain.operator.cluster import API_CALLS

    called = calls_made_by_the_operator()
    declared = {(g, r): set(v) for g, r, v in API_CALLS}
    # the in-memory run exercised every declared call, and declared covers every call made
    for key, verbs in called.items():
        assert verbs <= declared[key], (key, verbs)
    assert called == declared, "API_CALLS lists a call that no lifecycle path makes (or misses one)"
    expected = {key: declared.get(key, set()) | KOPF_JOB_RULES.get(key, set()) for key in {*declared, *KOPF_JOB_RULES}}
    nodes = {WATCHED_NODES[:2]: set(WATCHED_NODES[2])}
    cluster = rbac_rules(template(VALUES["default"]), "ClusterRole")
    assert cluster == {**expected, **KOPF_CLUSTER_RULES, **nodes}
    namespaced = template(VALUES["ci-values"])  # nodeHealth off: no ClusterRole
    assert rbac_rules(namespaced, "Role") == expected and rbac_rules(namespaced, "ClusterRole") == {}
    with_nodes = template(["--set", "watchNamespaces={a}"])
    assert rbac_rules(with_nodes, "ClusterRole") == nodes, "namespaced: nodes alone are read cluster-wide"
    for values in VALUES.values():
        objs = template(values)
        assert rbac_rules(objs, "Role", leader=True) == LEADER_ELECTION_RULES, "leases, and only those"
        lease_role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"].endswith("-leader-election"))
        assert lease_role["metadata"]["namespace"] == "pretrain-system", "in the operator's own namespace"


def test_replicas_need_leader_election() -> None:
    dep = next(o for o in template(["--set", "replicaCount=3"]) if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-elect" in c["args"] and "--leader-election-id=ptr-pretrain-operator" in c["args"]
    assert {e["name"] for e in c["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    proc = subprocess.run([HELM, "template", "x", str(CHART), "--set", "replicaCount=2",
                           "--set", "leaderElection.enabled=false"], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode != 0 and "replicaCount above 1 needs leaderElection.enabled" in proc.stderr
    dep = next(o for o in template(["--set", "leaderElection.enabled=false"]) if o["kind"] == "Deployment")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert "--leader-elect" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]
