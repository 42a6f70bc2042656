"""Two reconcilers of one job, interleaved at random, with stale views, against the API emulator.

A reconcile reads the job (its status may be stale by the time it acts, as Kopf's cached body
can be), then observes the pods and acts. The invariant: a reconcile whose view is stale never
deletes a pod of the current attempt or a newer one, the stored attempt and restart count never go
back, and whatever the interleaving, the job converges to one whole gang of its current attempt.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pretrain.operator.cluster import Conflict, KubeCluster
from pretrain.operator.reconcile import apply_plan, job_from, observe_for, plan_for
from tests.kubeapi.harness import start_apiserver
from tests.kubeapi.server import ApiServer
from tests.operator.harness import job_manifest

NODES = 2
_names = itertools.count()


class World:
    """One job in the emulator, two reconcilers (A, B), a node and a clock."""

    def __init__(self, api: ApiServer) -> None:
        import kubernetes

        self.client = kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.cluster = KubeCluster(self.client)
        self.name = f"fence-{next(_names)}"
        doc = job_manifest(self.name, {"resources.nodes": NODES, "resources.procsPerNode": 1,
                                       "checkpoint.uri": "s3://b/c", "runPolicy.restartBackoffSeconds": 1,
                                       "runPolicy.maxRestarts": 50})  # fmt: skip
        kubernetes.client.CustomObjectsApi(self.client).create_namespaced_custom_object(
            "pretrain.io", "v1alpha1", "default", "pretrainjobs", doc
        )
        self.now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
        self.views: dict[str, dict[str, Any] | None] = {"A": None, "B": None}
        self.max_attempt = 0
        self.max_restarts = 0

    def stored(self) -> dict[str, Any]:
        job = self.cluster.read_job("default", self.name)
        assert job is not None
        return job

    def live(self) -> set[tuple[str, int]]:
        return {(p.name, p.attempt) for p in self.cluster.observe("default", self.name).pods if not p.deleting}

    # ---- reconcilers
    def read(self, who: str) -> None:
        self.views[who] = self.stored()

    def act(self, who: str) -> None:
        view = self.views[who] or self.stored()
        self.views[who] = None
        before = self.stored()
        stale = view["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
        current = int((before.get("status") or {}).get("attempt") or 0)
        live_before = self.live()
        with contextlib.suppress(Conflict):  # the fenced status write refused a stale view: nothing done
            job, invalid = job_from(view)
            observed = observe_for(self.cluster, view, job)  # the pods as they are now; the status as read
            apply_plan(view, plan_for(view, job, invalid, observed, self.now), self.cluster, self.now)
        deleted = live_before - self.live()
        if stale:
            assert all(attempt < current for _, attempt in deleted), (
                f"a stale view (read at attempt {(view.get('status') or {}).get('attempt')}) deleted {sorted(deleted)} "
                f"while attempt {current} is current"
            )
        status = self.stored().get("status") or {}
        assert int(status.get("attempt") or 0) >= self.max_attempt, "the attempt went back"
        assert int(status.get("restarts") or 0) >= self.max_restarts, "the restart count went back"
        self.max_attempt = int(status.get("attempt") or 0)
        self.max_restarts = int(status.get("restarts") or 0)

    # ---- the node
    def pods(self) -> list[Any]:
        return [
            p
            for p in self.core.list_namespaced_pod("default", label_selector=f"pretrain.io/job-name={self.name}").items
        ]

    def run_all(self) -> None:
        for p in self.pods():
            if not p.spec.node_name:
                body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": p.metadata.name},
                        "target": {"kind": "Node", "name": "n0"}}  # fmt: skip
                self.core.create_namespaced_pod_binding(p.metadata.name, "default", body, _preload_content=False)
            if p.status.phase == "Pending" and not p.metadata.deletion_timestamp:
                self.core.patch_namespaced_pod_status(
                    p.metadata.name, "default", {"status": {"phase": "Running", "podIP": "10.0.0.1"}}
                )

    def fail(self, rank: int) -> None:
        pods = [
            p
            for p in self.pods()
            if p.metadata.labels["pretrain.io/node-rank"] == str(rank) and not p.metadata.deletion_timestamp
        ]
        if pods:
            newest = max(pods, key=lambda p: int(p.metadata.labels["pretrain.io/attempt"]))
            term = {"exitCode": 1, "reason": "Error"}
            self.core.patch_namespaced_pod_status(newest.metadata.name, "default", {"status": {
                "phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": False,
                                                          "restartCount": 0, "state": {"terminated": term}}]}})  # fmt: skip

    def confirm(self) -> None:
        for p in self.pods():
            if p.metadata.deletion_timestamp:
                self.core.delete_namespaced_pod(p.metadata.name, "default", grace_period_seconds=0)

    def wait(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_apiserver(tmp_path_factory.mktemp("fencing"))
    yield server
    server.stop()


steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["read", "act"]), st.sampled_from(["A", "B"])),
        st.tuples(st.just("run"), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, NODES - 1)),
        st.tuples(st.just("confirm"), st.just(0)),
        st.tuples(st.just("wait"), st.integers(1, 4)),
    ),
    min_size=5,
    max_size=30,
)


@pytest.mark.slow  # 20 s of generated scripts: in `make test`, not the fast tier
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])  # fmt: skip
@given(script=steps)
# The review's finding: A reads the job while it restarts; B starts attempt 2; A, acting on its
# stale view, took the new pods for leftovers and deleted them.
@example(
    script=[
        ("act", "B"),
        ("run", 0),
        ("act", "B"),
        ("fail", 0),
        ("act", "B"),
        ("read", "A"),
        ("confirm", 0),
        ("wait", 3),
        ("act", "B"),
        ("act", "A"),
    ]
)
def test_stale_reconcilers_never_delete_the_live_gang_and_the_job_converges(
    api: ApiServer, script: list[tuple[str, Any]]
) -> None:
    w = World(api)
    for action, arg in script:
        if action == "read":
            w.read(arg)
        elif action == "act":
            w.act(arg)
        elif action == "run":
            w.run_all()
        elif action == "fail":
            w.fail(arg)
        elif action == "confirm":
            w.confirm()
        else:
            w.wait(arg)
    # then a calm world: fresh reconciles, a node that runs and confirms, time that passes
    for _ in range(12):
        w.act("A")
        w.run_all()
        w.confirm()
        w.wait(3)
    status = w.stored()["status"]
    assert status["phase"] == "Running", status
    assert {a for _, a in w.live()} == {status["attempt"]} and len(w.live()) == NODES
