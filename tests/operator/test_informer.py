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
