"""Watch-fed caches of the jobs' children (client-go's reflector and indexer, for four kinds).

A reconcile used to list the job's pods and read its Service and ConfigMap: four requests per
reconcile, and a list with a label selector makes the API server scan every pod of the namespace.
Here each kind is listed once and then watched (label `pretrain.io/job-name`), and `observe`
answers from memory: a reconcile costs one read of the job. Every change of a child also queues
its job, which is how a failed pod reaches the planner within a watch event's latency.

A cache can lag the API by a watch event. The planner is safe with that: a pod it does not see
yet is created again (AlreadyExists is ignored), one already gone is deleted again (NotFound is
ignored), and a Running job only becomes Running from pods the cache did see. Before the first
list of every kind has arrived nothing is observed from here (`synced`), so a fresh operator
never mistakes "not listed yet" for "gone". A watch that breaks or falls behind the API's history
(410 Gone) is listed afresh, and the whole state replaced.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pretrain.operator.children import CONFIG_KEY, LABEL_JOB, configmap_name, controller_uid, service_name
from pretrain.operator.nodes import NodeView, node_view
from pretrain.operator.planner import Observed, PodView, pod_view
from pretrain.operator.preparation import PrepareView, prepare_job_name, prepare_view

log = logging.getLogger("pretrain.operator.informer")

#: What the caches need, as RBAC rules (the chart grants them; tests/test_chart.py checks it).
WATCHED: list[tuple[str, str, list[str]]] = [
    ("", "pods", ["list", "watch"]),
    ("", "services", ["list", "watch"]),
    ("", "configmaps", ["list", "watch"]),
    ("batch", "jobs", ["list", "watch"]),
]
#: Read cluster-wide when granted (chart value nodeHealth): a NotReady node ends its gang's
#: attempt at once (nodes.py). Without the grant the operator runs on, told once in its log.
WATCHED_NODES = ("", "nodes", ["list", "watch"])
#: Seconds between tries to list Nodes after the API refused it (403).
NODES_RETRY = 300.0
#: Seconds a watch request lasts before it is renewed from the last resourceVersion seen.
WATCH_TIMEOUT = 300

Key = tuple[str, str]  # (namespace, name)
KINDS = ("pods", "services", "configmaps", "jobs")


class Gone(Exception):
    """The watch's resourceVersion is older than the API server's history: list again."""


@dataclass
class ChildCache:
    """The jobs' pods (as PodViews, by job), Services and ConfigMaps (by name) and preparation
    Jobs (by PretrainJob), in memory."""

    notify: Callable[[str, str], None] = lambda namespace, job: None  # a child of (namespace, job) changed
    #: The (kind, namespace) lists that must have arrived before `synced` (namespace None: all).
    expected: set[tuple[str, str | None]] = field(default_factory=lambda: {(k, None) for k in KINDS})
    pods: dict[Key, dict[str, PodView]] = field(default_factory=dict)  # (ns, job) -> name -> view
    services: dict[Key, str | None] = field(default_factory=dict)  # (ns, name) -> controller uid
    configmaps: dict[Key, tuple[str | None, str | None]] = field(default_factory=dict)  # -> (job.json, uid)
    jobs: dict[Key, PrepareView] = field(default_factory=dict)  # (ns, PretrainJob) -> its preparation Job
    nodes: dict[str, NodeView] = field(default_factory=dict)  # every node, by name
    lock: threading.Lock = field(default_factory=threading.Lock)
    _listed: set[tuple[str, str | None]] = field(default_factory=set)
    _owner: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (kind, ns, name) -> job

    @property
    def synced(self) -> bool:
        return self._listed >= self.expected

    def observe(self, namespace: str, job: str, pod_monitor: Callable[[], bool] | None = None) -> Observed:
        """The children of one job as the caches hold them (same shape as KubeCluster.observe)."""
        with self.lock:
            pods = sorted(self.pods.get((namespace, job), {}).values(), key=lambda p: p.name)
            nodes = {p.node: self.nodes[p.node] for p in pods if p.node and p.node in self.nodes}
            service_key, config_key = (namespace, service_name(job)), (namespace, configmap_name(job))
            config, config_owner = self.configmaps.get(config_key, (None, None))
            return Observed(
                pods=pods,
                service=service_key in self.services,
                configmap=config_key in self.configmaps,
                pod_monitor=pod_monitor() if pod_monitor else False,
                config=config,
                service_owner=self.services.get(service_key),
                configmap_owner=config_owner,
                prepare_job=self.jobs.get((namespace, job)),
                nodes=nodes,
            )

    # ---- updates (from the reflectors)

    def replace(self, kind: str, items: list[dict[str, Any]], namespace: str | None) -> None:
        """A fresh list of `kind` (in `namespace`, or everywhere): the whole state of that kind."""
        if kind == "nodes":
            self._replace_nodes(items)
            return
        with self.lock:
            gone = [k for k in self._owner if k[0] == kind and (namespace is None or k[1] == namespace)]
            touched = {(ns, job) for _, ns, name in gone if (job := self._remove(kind, ns, name))}
            for obj in items:
                touched |= self._apply(kind, "ADDED", obj)
            self._listed.add((kind, namespace))
        for ns, job in touched:
            self.notify(ns, job)

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        with self.lock:
            touched = self._apply_node(type_, obj) if kind == "nodes" else self._apply(kind, type_, obj)
        for ns, job in touched:
            self.notify(ns, job)

    def listed(self, kind: str, namespace: str | None = None) -> bool:
        with self.lock:
            return (kind, namespace) in self._listed

    def listed_without(self, kind: str) -> None:
        """`kind` cannot be listed (forbidden): count it as listed, so the rest is observed."""
        with self.lock:
            self._listed.add((kind, None))

    def _replace_nodes(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            views = {v.name: v for v in map(node_view, items)}
            changed = {n for n in set(views) | set(self.nodes) if views.get(n) != self.nodes.get(n)}
            self.nodes = views
            self._listed.add(("nodes", None))
            touched = self._jobs_on(changed)
        for ns, job in touched:
            self.notify(ns, job)

    def _apply_node(self, type_: str, obj: dict[str, Any]) -> set[Key]:
        """A Node event, under the lock: the jobs with pods on it when its conditions changed (a
        heartbeat alone changes nothing)."""
        view = node_view(obj)
        old = self.nodes.pop(view.name, None)
        if type_ != "DELETED":
            self.nodes[view.name] = view
        return self._jobs_on({view.name}) if self.nodes.get(view.name) != old else set()

    def _jobs_on(self, nodes: set[str]) -> set[Key]:
        return {key for key, views in self.pods.items() if any(v.node in nodes for v in views.values())}

    def _remove(self, kind: str, ns: str, name: str) -> str | None:
        job = self._owner.pop((kind, ns, name), None)
        if kind == "pods" and job is not None:
            views = self.pods.get((ns, job), {})
            views.pop(name, None)
            if not views:
                self.pods.pop((ns, job), None)
        elif kind == "services":
            self.services.pop((ns, name), None)
        elif kind == "configmaps":
            self.configmaps.pop((ns, name), None)
        elif kind == "jobs" and job is not None:
            self.jobs.pop((ns, job), None)
        return job

    def _apply(self, kind: str, type_: str, obj: dict[str, Any]) -> set[Key]:
        """One ADDED/MODIFIED/DELETED, under the lock; the (namespace, job) keys it touched."""
        meta = obj["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        old = self._remove(kind, ns, name)
        job = (meta.get("labels") or {}).get(LABEL_JOB)
        if type_ != "DELETED" and job:
            self._owner[(kind, ns, name)] = job
            if kind == "pods":
                self.pods.setdefault((ns, job), {})[name] = pod_view(obj)
            elif kind == "services":
                self.services[(ns, name)] = controller_uid(meta)
            elif kind == "jobs":
                if name != prepare_job_name(job):
                    self._owner.pop((kind, ns, name), None)
                    return {(ns, j) for j in (old,) if j}  # a Job with the label that is not the stage's
                self.jobs[(ns, job)] = prepare_view(obj)
            else:
                self.configmaps[(ns, name)] = ((obj.get("data") or {}).get(CONFIG_KEY), controller_uid(meta))
        return {(ns, j) for j in (old, job) if j}


def watch_lines(response: Any) -> Iterator[dict[str, Any]]:
    """The JSON events of a chunked watch response, one per line."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


class Reflector:
    """List, then watch from the list's resourceVersion, feeding a ChildCache; on a broken stream
    watch again from the last version seen, on 410 Gone list again. Runs in a daemon thread."""

    def __init__(self, cache: ChildCache, kind: str, list_call: Callable[..., Any], namespace: str | None,
                 stop: threading.Event, retry: float = 1.0) -> None:  # fmt: skip
        self.cache, self.kind, self.list_call, self.namespace = cache, kind, list_call, namespace
        self.stop, self.retry = stop, retry
        # every child carries the job's name label; Nodes are all read
        self.selector: str | None = None if kind == "nodes" else LABEL_JOB
        self.relists = 0
        self.watch_timeout = WATCH_TIMEOUT

    def _call(self, **kwargs: Any) -> Any:
        args = (self.namespace,) if self.namespace is not None else ()
        return self.list_call(*args, label_selector=self.selector, _preload_content=False, **kwargs)

    def list(self) -> str:
        doc = json.loads(self._call().data)
        self.cache.replace(self.kind, doc.get("items") or [], self.namespace)
        self.relists += 1
        return str(doc["metadata"]["resourceVersion"])

    def watch(self, rv: str) -> str:
        """Follow events from `rv` until the server ends the request; the last version seen."""
        response = self._call(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, _request_timeout=self.watch_timeout + 30)  # fmt: skip
        try:
            for ev in watch_lines(response):
                if self.stop.is_set():
                    break
                obj = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resourceVersion too old"))
                    raise RuntimeError(f"watch error: {obj.get('message', obj)}")
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if ev.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self.cache.event(self.kind, ev["type"], obj)
        finally:
            response.release_conn()
        return rv

    def run(self, resume_from: str | None = None) -> None:
        """List (unless resuming from a version already listed), then watch, until stopped."""
        rv = resume_from
        while not self.stop.is_set():
            try:
                if rv is None:
                    rv = self.list()
                rv = self.watch(rv)
            except Gone as e:
                log.info("%s watch expired (%s); listing again", self.kind, e)
                rv = None
            except Exception as e:  # a broken connection or an API error: list again after a pause
                rv = None
                if self.kind == "nodes" and getattr(e, "status", None) == 403:
                    self._nodes_forbidden()
                    continue
                log.warning("%s watch failed (%s: %s); listing again in %.0fs", self.kind, type(e).__name__, e,
                            self.retry)  # fmt: skip
                self.stop.wait(self.retry)

    def _nodes_forbidden(self) -> None:
        """Nodes may not be read: told once, observed without them, tried again now and then."""
        if not self.cache.listed("nodes"):
            log.warning("the operator may not list Nodes (403): a NotReady node ends its gang's attempt only when "
                        "its pods fail; grant nodes list and watch (chart value nodeHealth) to end it at once")  # fmt: skip
            self.cache.listed_without("nodes")
        self.stop.wait(NODES_RETRY)

    def start(self) -> Reflector:
        threading.Thread(target=self.run, name=f"reflector-{self.kind}-{self.namespace or 'all'}", daemon=True).start()
        return self


def start_reflectors(
    cache: ChildCache, api_client: Any, namespaces: list[str], stop: threading.Event
) -> list[Reflector]:
    """One reflector per kind (per namespace when the operator watches some, else cluster-wide)."""
    import kubernetes

    core = kubernetes.client.CoreV1Api(api_client)
    batch = kubernetes.client.BatchV1Api(api_client)
    calls = {
        "pods": (core.list_namespaced_pod, core.list_pod_for_all_namespaces),
        "services": (core.list_namespaced_service, core.list_service_for_all_namespaces),
        "configmaps": (core.list_namespaced_config_map, core.list_config_map_for_all_namespaces),
        "jobs": (batch.list_namespaced_job, batch.list_job_for_all_namespaces),
    }
    scopes: list[str | None] = list(namespaces) if namespaces else [None]
    cache.expected = {(kind, ns) for kind in KINDS for ns in scopes} | {("nodes", None)}
    out = [Reflector(cache, "nodes", core.list_node, None, stop).start()]
    for kind, (namespaced, everywhere) in calls.items():
        if namespaces:
            out += [Reflector(cache, kind, namespaced, ns, stop).start() for ns in namespaces]
        else:
            out.append(Reflector(cache, kind, everywhere, None, stop).start())
    return out
