"""The children's caches against the API emulator: after any sequence of changes they answer
what a fresh read of the API answers, they say nothing before their first lists, every change
queues its job, and a watch that falls behind the API's history lists afresh."""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Any

import kubernetes
import pytest

from pretrain.operator.cluster import AlreadyExists, KubeCluster
from pretrain.operator.informer import ChildCache, Gone, Reflector, start_reflectors
from tests.kubeapi.harness import wait_for
from tests.kubeapi.server import ApiServer

JOBS = ["alpha", "beta", "gamma"]


def client(api: ApiServer) -> Any:
    return kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig))


def pod(job: str, attempt: int, rank: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{job}-a{attempt}-n{rank}", "namespace": "default", "labels": {
        "pretrain.io/job-name": job, "pretrain.io/attempt": str(attempt), "pretrain.io/node-rank": str(rank)}},
        "spec": {"containers": [{"name": "trainer", "image": "i"}]}}  # fmt: skip


def child(kind: str, job: str) -> dict[str, Any]:
    meta = {"namespace": "default", "labels": {"pretrain.io/job-name": job}}
    if kind == "Service":
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": job, **meta},
                "spec": {"clusterIP": "None", "ports": [{"port": 29500}]}}  # fmt: skip
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{job}-config", **meta},
            "data": {"job.json": f"{{{random.random()}}}"}}  # fmt: skip


def agree(cache: ChildCache, cluster: KubeCluster) -> bool:
    return all(cache.observe("default", j) == cluster.observe("default", j, pod_monitor=False) for j in JOBS)


def test_the_cache_answers_what_the_api_answers(api: ApiServer) -> None:
    c = client(api)
    cluster = KubeCluster(c)
    core = kubernetes.client.CoreV1Api(c)
    for j in JOBS[:2]:
        cluster.create(pod(j, 1, 0))
    notified: list[tuple[str, str]] = []
    cache = ChildCache(notify=lambda ns, job: notified.append((ns, job)))
    assert not cache.synced
    stop = threading.Event()
    start_reflectors(cache, c, ["default"], stop)
    try:
        wait_for(lambda: cache.synced, 10, "the first lists")
        assert agree(cache, cluster)
        rng = random.Random(7)
        for step in range(40):  # creations, status writes, deletions (graceful and not), of every kind
            j = rng.choice(JOBS)
            action = rng.choice(["pod", "status", "delete-pod", "svc", "cm", "delete-svc", "delete-cm"])
            pods = [p.name for p in cluster.observe("default", j, pod_monitor=False).pods]
            if action == "pod":
                with contextlib.suppress(AlreadyExists):
                    cluster.create(pod(j, rng.randint(1, 3), rng.randint(0, 2)))
            elif action == "status" and pods:
                core.patch_namespaced_pod_status(rng.choice(pods), "default", {"status": {
                    "phase": rng.choice(["Running", "Failed"]), "podIP": "10.0.0.1"}})  # fmt: skip
            elif action == "delete-pod" and pods:
                cluster.delete("Pod", "default", rng.choice(pods))
            elif action in ("svc", "cm"):
                with contextlib.suppress(AlreadyExists):
                    cluster.create(child("Service" if action == "svc" else "ConfigMap", j))
            elif action == "delete-svc" and cluster.observe("default", j, pod_monitor=False).service:
                cluster.delete("Service", "default", j)
            elif action == "delete-cm" and cluster.observe("default", j, pod_monitor=False).configmap:
                cluster.delete("ConfigMap", "default", f"{j}-config")
            if step % 5 == 4:
                wait_for(lambda: agree(cache, cluster), 10, f"the cache to agree after step {step}")
        wait_for(lambda: agree(cache, cluster), 10, "the cache to agree")
        assert {job for _, job in notified} == set(JOBS), "every change queued its job"
    finally:
        stop.set()


def test_a_watch_behind_the_history_lists_again(api: ApiServer) -> None:
    """The watch broke (a restart of the API server, a network cut) and etcd compacted meanwhile:
    watching again from the last version seen answers 410 Gone, so the reflector lists afresh."""
    c = client(api)
    cluster = KubeCluster(c)
    core = kubernetes.client.CoreV1Api(c)
    cache = ChildCache(expected={("pods", "default")})
    stop = threading.Event()
    reflector = Reflector(cache, "pods", core.list_namespaced_pod, "default", stop, retry=0.1)
    cluster.create(pod("alpha", 1, 0))
    seen = reflector.list()
    assert cache.synced and [p.name for p in cache.observe("default", "alpha").pods] == ["alpha-a1-n0"]
    cluster.create(pod("alpha", 1, 1))
    cluster.delete("Pod", "default", "alpha-a1-n0")
    api.call(lambda s: s.compact())  # etcd compaction: `seen` is now older than the history
    with pytest.raises(Gone):
        reflector.watch(seen)
    threading.Thread(target=reflector.run, args=(seen,), daemon=True).start()
    try:
        wait_for(lambda: reflector.relists >= 2, 10, "a fresh list after 410 Gone")
        wait_for(lambda: agree(cache, cluster), 10, "the cache to agree after the relist")
        assert [p.name for p in cache.observe("default", "alpha").pods] == ["alpha-a1-n1"]
    finally:
        stop.set()


def node(name: str, ready: str, heartbeat: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": {"conditions": [
        {"type": "Ready", "status": ready, "reason": "KubeletReady" if ready == "True" else "NodeStatusUnknown",
         "lastHeartbeatTime": heartbeat}]}}  # fmt: skip


def test_a_node_turning_notready_queues_the_jobs_on_it(api: ApiServer) -> None:
    """Issue 29 item 3: Nodes are listed and watched cluster-wide; a change of a node's conditions
    queues every job with a pod bound there and shows in their observation; a heartbeat alone
    (lastHeartbeatTime) queues nothing."""
    c = client(api)
    core = kubernetes.client.CoreV1Api(c)
    core.create_node(node("n-1", "True"))
    bound = pod("alpha", 1, 0)
    bound["spec"]["nodeName"] = "n-1"
    KubeCluster(c).create(bound)
    KubeCluster(c).create(pod("beta", 1, 0))  # not bound
    notified: list[str] = []
    cache = ChildCache(notify=lambda ns, job: notified.append(job))
    stop = threading.Event()
    start_reflectors(cache, c, ["default"], stop)
    try:
        wait_for(lambda: cache.synced, 10, "the first lists")
        assert cache.observe("default", "alpha").nodes["n-1"].conditions[0][:2] == ("Ready", "True")
        assert cache.observe("default", "beta").nodes == {}
        notified.clear()
        core.patch_node_status("n-1", node("n-1", "True", heartbeat="2026-01-01T00:00:10Z"))
        core.create_node(node("n-2", "True"))  # a change that queues no job: nobody runs there
        wait_for(lambda: "n-2" in cache.nodes, 10, "the new node")
        assert notified == [], "a heartbeat is no change"
        core.patch_node_status("n-1", {"status": {"conditions": [{"type": "Ready", "status": "Unknown",
                                                                "reason": "NodeStatusUnknown"}]}})  # fmt: skip
        wait_for(lambda: notified == ["alpha"], 10, "the job on the node queued")
        assert cache.observe("default", "alpha").nodes["n-1"].conditions[0][:2] == ("Ready", "Unknown")
    finally:
        stop.set()


def test_an_operator_that_may_not_read_nodes_runs_on(api: ApiServer, tmp_path: Any, caplog: Any) -> None:
    """A namespaced install without the nodes ClusterRole (chart value nodeHealth off): the Node
    list is refused (403), said once in the log, and the other caches still sync."""
    from tests.kubeapi.harness import chart_rbac

    user, rbac = chart_rbac("default", ("default",))
    rbac = [o for o in rbac if not o["metadata"]["name"].endswith("-nodes")]
    kubeconfig = api.kubeconfig_for(user, rbac, tmp_path / "kubeconfig")
    c = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kubernetes.client.CoreV1Api(c).list_node()
    assert refused.value.status == 403
    cache = ChildCache()
    stop = threading.Event()
    caplog.set_level("WARNING", logger="pretrain.operator.informer")
    start_reflectors(cache, c, ["default"], stop)
    try:
        wait_for(lambda: cache.synced, 10, "the first lists without nodes")
        said = [r.getMessage() for r in caplog.records if "may not list Nodes" in r.getMessage()]
        assert len(said) == 1, caplog.records
    finally:
        stop.set()
