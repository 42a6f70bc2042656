"""One contract, two implementations of the operator's `Cluster`: `KubeCluster` over the real
`kubernetes` client against the API emulator, and the `InMemoryCluster` the fast planner and
property tests use. The in-memory double is kept only because it passes the same suite: it may not
be more lenient than the API server on anything the operator relies on."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from pretrain.operator.children import CONFIG_KEY, build_configmap
from pretrain.operator.cluster import AlreadyExists, Cluster, KubeCluster, NotFound
from pretrain.operator.planner import Event, Observed, plan
from pretrain.operator.reconcile import job_from
from tests.kubeapi.harness import start_apiserver
from tests.kubeapi.server import ApiServer
from tests.operator.harness import job_body
from tests.operator.memory_cluster import InMemoryCluster


class Backend(Protocol):
    """A cluster plus the node-side actions (bind, report a phase, confirm a deletion)."""

    cluster: Cluster

    def now(self) -> datetime: ...
    def bind(self, pod: str) -> None: ...
    def set_phase(self, pod: str, phase: str, exit_code: int | None = None, message: str = "") -> None: ...
    def confirm_deletions(self) -> None: ...
    def events(self, job: str) -> list[tuple[str, str]]: ...

    def owner(self, body: dict[str, Any]) -> str:
        """The uid of the job the children belong to (the API server's garbage collector
        deletes children whose owner does not exist)."""
        ...


@dataclass
class Memory:
    cluster: InMemoryCluster

    def now(self) -> datetime:
        return self.cluster.now

    def bind(self, pod: str) -> None:
        pass  # in-memory pods behave as bound: their deletion is graceful

    def set_phase(self, pod: str, phase: str, exit_code: int | None = None, message: str = "") -> None:
        self.cluster.set_phase(pod, phase, exit_code, message)

    def confirm_deletions(self) -> None:
        self.cluster.settle()

    def events(self, job: str) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for j, e in self.cluster.events if j == job]

    def owner(self, body: dict[str, Any]) -> str:
        return str(body["metadata"]["uid"])  # no garbage collector here to find it missing


class Emulated:
    def __init__(self, api: ApiServer) -> None:
        import kubernetes

        self.api = api
        self.client = kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.cluster = KubeCluster(self.client)

    def now(self) -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)

    def bind(self, pod: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod},
            "target": {"kind": "Node", "name": "n0"},
        }
        self.core.create_namespaced_pod_binding(pod, "default", body, _preload_content=False)

    def set_phase(self, pod: str, phase: str, exit_code: int | None = None, message: str = "") -> None:
        status: dict[str, Any] = {"phase": phase}
        if phase == "Running":
            status["podIP"] = "10.1.0.7"
        if exit_code is not None:
            term = {"exitCode": exit_code, "reason": "Error", "message": message}
            status["containerStatuses"] = [{"name": "trainer", "image": "i", "imageID": "", "ready": False,
                                            "restartCount": 0, "state": {"terminated": term}}]  # fmt: skip
        self.core.patch_namespaced_pod_status(pod, "default", {"status": status})

    def confirm_deletions(self) -> None:
        for p in self.core.list_namespaced_pod("default").items:
            if p.metadata.deletion_timestamp:
                self.core.delete_namespaced_pod(p.metadata.name, "default", grace_period_seconds=0)

    def owner(self, body: dict[str, Any]) -> str:
        import kubernetes

        doc = {k: v for k, v in body.items() if k != "status"}
        doc["metadata"] = {"name": body["metadata"]["name"]}
        made = kubernetes.client.CustomObjectsApi(self.client).create_namespaced_custom_object(
            "pretrain.io", "v1alpha1", "default", "pretrainjobs", doc
        )
        return str(made["metadata"]["uid"])

    def events(self, job: str) -> list[tuple[str, str]]:
        evs = self.core.list_namespaced_event("default", field_selector=f"involvedObject.name={job}").items
        return [(e.type, e.reason) for e in sorted(evs, key=lambda e: e.metadata.resource_version)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    api = start_apiserver(tmp_path_factory.mktemp("contract"))
    yield api
    api.stop()


_counter = iter(range(10_000))


@pytest.fixture(params=["memory", "emulator"])
def backend(request: pytest.FixtureRequest, emulator: ApiServer) -> Backend:
    if request.param == "memory":
        return Memory(InMemoryCluster())
    return Emulated(emulator)


def first_plan(backend: Backend, name: str, nodes: int = 2, **overrides: Any) -> tuple[Any, str, list[dict[str, Any]]]:
    """The job's first plan, with its owner made in the cluster: (job, uid, objects to create)."""
    body = job_body({"resources.nodes": nodes, "resources.procsPerNode": 1, "checkpoint.uri": "s3://b/c", **overrides},
                    name=name)  # fmt: skip
    job, _ = job_from(body)
    uid = backend.owner(body)
    p = plan(job, name=name, namespace="default", uid=uid, generation=1, status={}, observed=Observed(),
             now=datetime(2026, 1, 1))  # fmt: skip
    return job, uid, p.create


def create_all(backend: Backend, objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        backend.cluster.create(copy.deepcopy(obj))


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


def test_creating_an_existing_object_raises_already_exists(backend: Backend) -> None:
    _, _, objs = first_plan(backend, unique("dup"))
    create_all(backend, objs)
    for obj in objs:
        with pytest.raises(AlreadyExists):
            backend.cluster.create(copy.deepcopy(obj))


def test_deleting_or_replacing_a_missing_object_raises_not_found(backend: Backend) -> None:
    job, _, _ = first_plan(backend, unique("missing"))
    for kind in ("Pod", "Service", "ConfigMap"):
        with pytest.raises(NotFound):
            backend.cluster.delete(kind, "default", "no-such-object")
    cm = build_configmap(job, "default", "uid-x")
    with pytest.raises(NotFound):
        backend.cluster.replace(cm)


def test_observe_finds_exactly_the_jobs_children(backend: Backend) -> None:
    name, other = unique("obs"), unique("other")
    _, _, objs = first_plan(backend, name)
    create_all(backend, objs)
    create_all(backend, first_plan(backend, other, nodes=1)[2])
    seen = backend.cluster.observe("default", name)
    assert sorted((p.name, p.attempt, p.rank, p.phase) for p in seen.pods) == [
        (f"{name}-a1-n0", 1, 0, "Pending"), (f"{name}-a1-n1", 1, 1, "Pending")]  # fmt: skip
    for p in seen.pods:
        assert p.created is not None and abs(p.created - backend.now()) < timedelta(minutes=2), p.created
        assert not p.deleting and p.exit_code is None
    assert seen.service and seen.configmap and not seen.pod_monitor
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert seen.config == cm["data"][CONFIG_KEY]
    assert len(backend.cluster.observe("default", other).pods) == 1


def test_observe_reads_what_the_kubelet_reports(backend: Backend) -> None:
    name = unique("kl")
    create_all(backend, first_plan(backend, name)[2])
    for rank in (0, 1):
        backend.bind(f"{name}-a1-n{rank}")
    backend.set_phase(f"{name}-a1-n0", "Running")
    backend.set_phase(f"{name}-a1-n1", "Failed", exit_code=137, message="RuntimeError: boom\nOOMKilled")
    pods = {p.rank: p for p in backend.cluster.observe("default", name).pods}
    assert pods[0].phase == "Running" and pods[0].ip
    assert (pods[1].phase, pods[1].exit_code, pods[1].message) == ("Failed", 137, "OOMKilled")


def test_deleting_a_bound_pod_is_graceful_until_the_kubelet_confirms(backend: Backend) -> None:
    name = unique("grace")
    create_all(backend, first_plan(backend, name, nodes=1)[2])
    pod = f"{name}-a1-n0"
    backend.bind(pod)
    backend.cluster.delete("Pod", "default", pod)
    (seen,) = backend.cluster.observe("default", name).pods
    assert seen.deleting, "a running pod lingers (terminating) after delete"
    backend.confirm_deletions()
    assert backend.cluster.observe("default", name).pods == []


def test_replace_changes_the_configmap(backend: Backend) -> None:
    name = unique("cm")
    job, uid, objs = first_plan(backend, name)
    create_all(backend, objs)
    cm = build_configmap(job, "default", uid)
    cm["data"][CONFIG_KEY] = '{"changed": true}'
    backend.cluster.replace(cm)
    assert backend.cluster.observe("default", name).config == '{"changed": true}'


def test_events_are_recorded_against_the_job(backend: Backend) -> None:
    name = unique("ev")
    backend.cluster.event("default", name, f"uid-{name}", Event("Warning", "GangRestart", "x" * 2000))
    backend.cluster.event("default", name, f"uid-{name}", Event("Normal", "Completed", "done"))
    assert backend.events(name) == [("Warning", "GangRestart"), ("Normal", "Completed")]


def test_kube_cluster_reads_the_pod_monitor_when_its_crd_is_installed(emulator: ApiServer, tmp_path: Path) -> None:
    """monitoring.podMonitor: the CRD absent answers 404, which reads as no PodMonitor; once the
    Prometheus Operator's CRD is installed, KubeCluster creates, sees and deletes one."""
    backend = Emulated(emulator)
    name = unique("pm")
    _, _, objs = first_plan(backend, name, **{"monitoring.podMonitor": True})
    monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    assert not backend.cluster.observe("default", name).pod_monitor
    crd = tmp_path / "podmonitor-crd.yaml"
    crd.write_text(PODMONITOR_CRD)
    emulator.install_crd(crd)
    backend.cluster.create(monitor)
    assert backend.cluster.observe("default", name).pod_monitor
    backend.cluster.delete("PodMonitor", "default", name)
    assert not backend.cluster.observe("default", name).pod_monitor


#: The shape of the Prometheus Operator's PodMonitor CRD (its schema cut to what the operator sets).
PODMONITOR_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {plural: podmonitors, singular: podmonitor, kind: PodMonitor, listKind: PodMonitorList, categories: [prometheus-operator]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            required: [selector]
            properties:
              selector:
                type: object
                properties:
                  matchLabels: {type: object, additionalProperties: {type: string}}
              podMetricsEndpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    path: {type: string}
                    interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
"""


@pytest.mark.parametrize(
    "stamp",
    ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00.123456Z",
     datetime(2026, 1, 1, tzinfo=UTC)],
)  # fmt: skip
def test_pod_timestamps_in_every_form_a_client_gives(stamp: Any) -> None:
    """The API server writes `Z`; the kubernetes client's typed models come back through
    sanitize_for_serialization as `+00:00` (the crash of every reconcile on a real cluster);
    MicroTime has fractions. All are the same instant to the planner."""
    from pretrain.operator.planner import pod_view

    pod = {"metadata": {"name": "p", "labels": {}, "creationTimestamp": stamp}, "status": {"phase": "Pending"}}
    created = pod_view(pod).created
    assert created is not None and abs(created - datetime(2026, 1, 1)) < timedelta(seconds=1)


def test_the_operators_merge_patch_and_the_emulators_agree() -> None:
    """Two RFC 7386 implementations written apart (a stand-in shares no code with what it tests)
    agree on every generated object and patch."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pretrain.operator.cluster import merge_patch as operators
    from tests.kubeapi.patches import merge_patch as emulators

    scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.sampled_from("abcd"), inner, max_size=4), max_leaves=12)  # fmt: skip
    objects = st.dictionaries(st.sampled_from("abcd"), values, max_size=4)

    @settings(max_examples=300, deadline=None)
    @given(objects, objects)
    def agree(target: dict[str, Any], patch: dict[str, Any]) -> None:
        before = copy.deepcopy(target)
        assert operators(target, patch) == emulators(target, patch)
        assert target == before, "the target is not changed in place"

    agree()
