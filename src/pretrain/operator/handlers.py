"""The controller, kept thin: watch events of jobs and of their pods feed a work queue; one worker
reconciles one job at a time (read it, observe its children, plan, write the status fenced by the
resourceVersion it read, then act).

No Kopf timers and no changing handlers: Kopf then puts no finalizer and no annotations on the
jobs, so deleting a job never waits for the operator (owner references take the children, with
the operator running or not). What timers did is the queue's: every job is requeued after
`resync` seconds, and sooner when its plan says so (backoff expiry, scheduling timeout, deadline,
TTL: `Plan.requeue_after`). A pod failure reaches the planner within a watch event's latency.

Tests call `reconcile_job` and `progress_job` over an in-memory cluster
(tests/operator/memory_cluster.py); `pretrain operator` runs the same functions under Kopf with a
`KubeCluster`.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import kopf

from pretrain.api.spec import GROUP, PLURAL, VERSION, Phase, PretrainJob
from pretrain.api.validation import SpecError, parse_spec
from pretrain.metrics import names as metric_names
from pretrain.operator import metrics
from pretrain.operator.cluster import AlreadyExists, Cluster, Conflict, NotFound, api_error
from pretrain.operator.informer import ChildCache, start_reflectors
from pretrain.operator.leader import FencedCluster, NotLeading
from pretrain.operator.planner import Event, Observed, Plan, plan, set_condition
from pretrain.operator.progress import evaluation_from, progress_from, scrape
from pretrain.storage.manifest import step_name

log = logging.getLogger("pretrain.operator")

#: Seconds between level-triggered reconciles of a job with nothing happening (the safety net:
#: events drive the rest). `pretrain operator --reconcile-interval` sets it.
RECONCILE_INTERVAL = float(os.environ.get("PRETRAIN_RECONCILE_INTERVAL", "300"))
#: Seconds between progress scrapes of a running job's node 0 (`--progress-interval`).
PROGRESS_INTERVAL = float(os.environ.get("PRETRAIN_PROGRESS_INTERVAL", "60"))


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0, tzinfo=None)


class _State:
    cluster: Cluster | None = None
    clock: Callable[[], datetime] = staticmethod(_utcnow)
    #: Set while this replica may act (it holds the leader lease); None: no leader election.
    gate: threading.Event | None = None
    #: Namespaces the operator watches (empty: the whole cluster); the CLI sets them.
    namespaces: list[str] = []


STATE = _State()


def use_cluster(cluster: Cluster, clock: Callable[[], datetime] | None = None) -> None:
    """Point the handlers at a cluster (and a clock): tests pass an InMemoryCluster."""
    STATE.cluster = cluster
    if clock is not None:
        STATE.clock = clock


def _cluster() -> Cluster:
    if STATE.cluster is None:
        from pretrain.operator.cluster import KubeCluster

        STATE.cluster = KubeCluster()
    return STATE.cluster


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=dict)) if x is not None else None


def _now() -> datetime:
    return STATE.clock()


def job_from(body: Mapping[str, Any]) -> tuple[PretrainJob | None, str | None]:
    meta = body["metadata"]
    try:
        spec = parse_spec(_plain(body.get("spec")) or {})
    except SpecError as e:
        return None, str(e)
    return PretrainJob(metadata={"name": meta["name"], "namespace": meta.get("namespace")}, spec=spec), None


def plan_for(body: Mapping[str, Any], job: PretrainJob | None, invalid: str | None, observed: Observed,
             now: datetime) -> Plan:  # fmt: skip
    """The plan for `body` (as read from the API, maybe a while ago) and what was observed."""
    meta = body["metadata"]
    return plan(job, name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""),
                generation=meta.get("generation"), status=_plain(body.get("status")) or {}, observed=observed,
                now=now, invalid=invalid)  # fmt: skip


Observer = Callable[[Cluster, Mapping[str, Any], "PretrainJob | None"], Observed]


def observe_for(cluster: Cluster, body: Mapping[str, Any], job: PretrainJob | None) -> Observed:
    """The job's children, read from the API; a PodMonitor is looked for only where one is
    asked for (or the spec is unreadable)."""
    meta = body["metadata"]
    wants_monitor = job is None or job.spec.monitoring.pod_monitor
    wants_prepare = job is None or job.spec.data.prepare is not None
    return cluster.observe(meta.get("namespace") or "default", meta["name"], pod_monitor=wants_monitor,
                           prepare=wants_prepare)  # fmt: skip


def cached_observer(cache: ChildCache) -> Observer:
    """The job's children from the watch-fed caches (the PodMonitor, when wanted, still read)."""

    def observe(cluster: Cluster, body: Mapping[str, Any], job: PretrainJob | None) -> Observed:
        meta = body["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        wants_monitor = job is None or job.spec.monitoring.pod_monitor
        return cache.observe(ns, name, (lambda: cluster.pod_monitor_exists(ns, name)) if wants_monitor else None)

    return observe


class ApplyFailed(Exception):
    """An API call of a plan failed; the job's ApplyFailed condition and an event say which."""


def apply_plan(body: Mapping[str, Any], p: Plan, cluster: Cluster, now: datetime | None = None) -> None:
    """Write the planned status first, fenced by the resourceVersion the plan was made from, then
    act. A reconcile whose view went stale (another reconcile, or any writer, changed the job
    since) gets Conflict before it touches a pod; the pods of a new attempt are created only once
    the attempt number is stored, so no crash can leave pods the status does not know of.

    Each action is tried even when an earlier one fails; a failure leaves the ApplyFailed
    condition (reason from the API error) and one Warning event, and raises ApplyFailed so the
    controller retries with backoff. Nothing created is deleted for it: the next reconcile sees
    the attempt's missing pods and creates just those. A PodMonitor that cannot be created (the
    Prometheus Operator's CRD absent) is a warning condition only: the pods start anyway."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace") or "default", meta.get("uid", "")
    old = _plain(body.get("status")) or {}
    change = status_patch(old, p.status)
    if change:
        cluster.write_status(namespace, name, change, meta.get("resourceVersion", ""))
    failures: list[tuple[str, str]] = []
    monitor_missing: str | None = None
    for obj in p.create:
        what = f"create {obj['kind']} {obj['metadata']['name']}"
        try:
            cluster.create(obj)
        except AlreadyExists:  # creation is idempotent
            pass
        except NotFound as e:
            if obj["kind"] == "PodMonitor":
                monitor_missing = (f"monitoring.podMonitor is set but no PodMonitor can be created ({e}); "
                                   "is the Prometheus Operator installed?")  # fmt: skip
            else:
                failures.append(("NotFound", f"{what}: {e}"))
        except Exception as e:
            reason, message = api_error(e)
            failures.append((reason, f"{what}: {message}"))
    for obj in p.replace:
        _attempt(failures, f"update {obj['kind']} {obj['metadata']['name']}", partial(cluster.replace, obj))
    for kind, child in p.delete:
        _attempt(failures, f"delete {kind} {child}", partial(cluster.delete, kind, namespace, child), missing_ok=True)
    for child in p.force_delete:
        _attempt(failures, f"force-delete Pod {child} (its node is bad)",
                 partial(cluster.delete, "Pod", namespace, child, grace=0), missing_ok=True)  # fmt: skip
    if p.suspend_job:
        _attempt(failures, "set spec.runPolicy.suspend", partial(cluster.suspend_job, namespace, name))
    for ev in p.events:
        cluster.event(namespace, name, uid, ev)
        log.info("%s/%s: %s %s: %s", namespace, name, ev.type, ev.reason, ev.message)
    if p.delete_job:
        _attempt(failures, "delete the job after its TTL", partial(cluster.delete_job, namespace, name, uid),
                 missing_ok=True)  # fmt: skip
    _report_conditions(namespace, name, uid, p.status, cluster, failures, monitor_missing, now or _now())
    if p.status.get("restarts", 0) > old.get("restarts", 0):
        metrics.RESTARTS.labels(namespace).inc()
    metrics.observe_phase(namespace, name, p.status.get("phase"))
    if failures:
        raise ApplyFailed(f"{failures[0][0]}: {failures[0][1]}")


def _attempt(failures: list[tuple[str, str]], what: str, call: Callable[[], None], *, missing_ok: bool = False) -> None:
    """One write of a plan: a failure is noted (reason, what: message) and the plan goes on."""
    try:
        call()
    except Exception as e:
        if missing_ok and isinstance(e, NotFound):
            return
        reason, message = api_error(e)
        failures.append((reason, f"{what}: {message}"))


def _report_conditions(namespace: str, name: str, uid: str, status: dict[str, Any], cluster: Cluster,
                       failures: list[tuple[str, str]], monitor_missing: str | None, now: datetime) -> None:  # fmt: skip
    """Keep the ApplyFailed and PodMonitorUnavailable conditions current; an event when one turns True."""
    conditions = [dict(c) for c in status.get("conditions") or []]
    before = {c["type"]: c.get("status") for c in conditions}
    changed = False
    for type_, reason, message in (
        ("ApplyFailed", failures[0][0] if failures else "Applied", failures[0][1][:1024] if failures else ""),
        ("PodMonitorUnavailable", "PodMonitorNotCreated" if monitor_missing else "", monitor_missing or ""),
    ):
        if not set_condition(conditions, type_, bool(message), reason, message, now):
            continue
        changed = True
        if message and before.get(type_) != "True":
            cluster.event(namespace, name, uid, Event("Warning", reason, message))
            log.warning("%s/%s: %s: %s", namespace, name, reason, message)
    if changed:
        cluster.write_status(namespace, name, {"conditions": conditions}, None)
        status["conditions"] = conditions


def reconcile(
    namespace: str, name: str, cluster: Cluster, now: datetime, observe: Observer = observe_for
) -> tuple[Plan, PretrainJob | None, Observed] | None:
    """One reconcile of one job: read it fresh from the API, observe, plan, apply. Returns the
    plan with the job and observation it was made from; None when the job is gone or being
    deleted (its children go with it, through their owner references)."""
    body = cluster.read_job(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    job, invalid = job_from(body)
    observed = observe(cluster, body, job)
    if job is not None and job.spec.data.prepare is not None and not (body.get("status") or {}).get("preparation"):
        # a new job with a preparation stage: once, whether another job of the namespace prepared its data
        observed = dataclasses.replace(observed, prepared_elsewhere=cluster.prepared_datasets(namespace))
    p = plan_for(body, job, invalid, observed, now)
    apply_plan(body, p, cluster, now)
    return p, job, observed


def reconcile_job(namespace: str, name: str, cluster: Cluster, now: datetime) -> Plan | None:
    done = reconcile(namespace, name, cluster, now)
    return done[0] if done is not None else None


@dataclass(frozen=True)
class ProgressTarget:
    """Where a running job's progress is read, and the status it would update."""

    url: str
    checkpoint_uri: str | None
    status: dict[str, Any]


def progress_target(job: PretrainJob | None, status: Mapping[str, Any], observed: Observed) -> ProgressTarget | None:
    if job is None or status.get("phase") not in (Phase.RUNNING.value, Phase.PENDING.value):
        return None
    node0 = [p for p in observed.pods
             if p.attempt == status.get("attempt") and p.rank == 0 and p.phase == "Running" and p.ip and not p.deleting]  # fmt: skip
    if not node0:
        return None
    url = f"http://{node0[0].ip}:{job.spec.monitoring.metrics_port}/metrics"
    return ProgressTarget(url, job.spec.checkpoint.uri, dict(status))


def progress_patch(target: ProgressTarget, now: datetime) -> dict[str, Any] | None:
    """The status patch of one scrape of node 0 (step, loss, tokens/s, ETA, last checkpoint, task
    metrics), or None when the scrape failed (the old values stay: a scrape never fails a job)."""
    try:
        samples = scrape(target.url)
    except OSError as e:
        log.debug("progress scrape of %s failed: %s", target.url, e)
        return None
    prog, ckpt = progress_from(samples, now)
    for key in (
        "storageRetrying",
        "heartbeat",
        "guard",
        "time",
    ):  # whose: a stale record of an earlier attempt means nothing
        if key in prog:
            prog[key]["attempt"] = target.status.get("attempt")
    old = target.status.get("progress") or {}
    if metric_names.STEP not in samples:  # still setting up: only the storage's state is news
        if "storageRetrying" in prog or old.get("storageRetrying"):
            return {"progress": {"storageRetrying": prog.get("storageRetrying"), "updatedTime": prog["updatedTime"]}}
        return None
    # A merge patch merges into the old progress: fields this scrape lacks are cleared explicitly.
    patch: dict[str, Any] = {"progress": {**{k: None for k in old if k not in prog}, **prog}}
    evaluation = evaluation_from(samples)
    if evaluation:
        patch["evaluation"] = evaluation
    if ckpt is not None:
        if target.checkpoint_uri:
            ckpt["uri"] = f"{target.checkpoint_uri.rstrip('/')}/{step_name(ckpt['step'])}"
        patch["lastCheckpoint"] = ckpt
    return patch


def progress_job(
    namespace: str, name: str, cluster: Cluster, now: datetime, target: ProgressTarget | None = None
) -> bool:
    """Scrape node 0 and write the progress into the status (merge patch, no precondition: it
    only touches the fields it owns). Without a cached target, the job and its pods are read."""
    if target is None:
        body = cluster.read_job(namespace, name)
        if body is None:
            return False
        job, _invalid = job_from(body)
        target = progress_target(job, _plain(body.get("status")) or {}, observe_for(cluster, body, job))
    if target is None:
        return False
    patch = progress_patch(target, now)
    if patch is None:
        return False
    cluster.write_status(namespace, name, patch, None)
    return True


def status_patch(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` status into `new` (removed keys become None)."""
    old = _plain(old) or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


class WorkQueue:
    """Job keys waiting for a reconcile: each key once, at its earliest due time (client-go's
    delaying queue). A key added while it is being processed is processed again after."""

    def __init__(self) -> None:
        self._due: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._cv = threading.Condition()

    def add(self, key: tuple[str, str], delay: float = 0.0) -> None:
        due = time.monotonic() + max(delay, 0.0)
        with self._cv:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))
            self._cv.notify()

    def forget(self, key: tuple[str, str]) -> None:
        with self._cv:
            self._due.pop(key, None)

    def get(self, stop: threading.Event) -> tuple[str, str] | None:
        with self._cv:
            while not stop.is_set():
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier add, or forgotten
                if self._heap and self._heap[0][0] <= time.monotonic():
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                timeout = self._heap[0][0] - time.monotonic() if self._heap else 1.0
                self._cv.wait(min(max(timeout, 0.01), 1.0))
        return None

    def __len__(self) -> int:
        with self._cv:
            return len(self._due)


class Controller:
    """The queue, its worker and the progress loop, fed by Kopf's watch events."""

    def __init__(self, cluster: Callable[[], Cluster], clock: Callable[[], datetime], resync: float,
                 progress_every: float, gate: threading.Event | None = None,
                 children: ChildCache | None = None) -> None:  # fmt: skip
        #: Under leader election every write is fenced by the gate (see `FencedCluster`).
        self.cluster = cluster if gate is None else (lambda: cast(Cluster, FencedCluster(cluster(), gate)))
        self.clock = clock
        #: Work is done only while the gate is set (the leader lease is held); a standby's watch
        #: events still fill the queue, so a new leader starts with every job queued.
        self.gate = gate
        #: The children's caches: reconciles wait for their first lists, then read from them.
        self.children = children
        self.observe: Observer = cached_observer(children) if children is not None else observe_for
        self.resync, self.progress_every = resync, progress_every
        self.queue = WorkQueue()
        self.stop = threading.Event()
        self.targets: dict[tuple[str, str], ProgressTarget] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._work, "reconcile-worker"), (self._progress_loop, "progress-scraper")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(10)

    def job_event(self, event_type: str, namespace: str, name: str) -> None:
        key = (namespace, name)
        if event_type == "DELETED":
            self.queue.forget(key)
            self.targets.pop(key, None)
            self.failures.pop(key, None)
            metrics.observe_phase(namespace, name, None)
            return
        self.queue.add(key)

    def child_event(self, namespace: str, job: str) -> None:
        self.queue.add((namespace, job))

    def process(self, key: tuple[str, str]) -> None:
        namespace, name = key
        t0 = time.perf_counter()
        try:
            done = reconcile(namespace, name, self.cluster(), self.clock(), self.observe)
        except Conflict:
            self.queue.add(key, 0.2)  # someone wrote the job meanwhile: nothing was done; read again
            return
        except NotLeading as e:
            log.info("%s/%s: reconcile stopped: %s", namespace, name, e)
            self.queue.add(key)  # the next leader's work
            return
        except Exception as e:
            n = self.failures[key] = self.failures.get(key, 0) + 1
            delay = min(2.0**n, 60.0)
            metrics.ERRORS.labels(namespace).inc()
            log.warning("%s/%s: reconcile failed (%s: %s); again in %.0fs", namespace, name, type(e).__name__, e, delay)
            self.queue.add(key, delay)
            return
        finally:
            metrics.RECONCILE.observe(time.perf_counter() - t0)
        self.failures.pop(key, None)
        if done is None:
            self.targets.pop(key, None)
            return
        p, job, observed = done
        target = progress_target(job, p.status, observed)
        if target is None:
            self.targets.pop(key, None)
        else:
            self.targets[key] = target
        # The resync is spread by +-10% (controller-runtime's jitter), so that jobs created together
        # are not all reconciled again in the same second, every period.
        resync = self.resync * random.uniform(0.9, 1.1)
        self.queue.add(key, min(resync, p.requeue_after) if p.requeue_after is not None else resync)

    def leading(self) -> bool:
        """Whether to act now: the lease held (or no election) and the children's caches listed."""
        return (self.gate is None or self.gate.is_set()) and (self.children is None or self.children.synced)

    def _work(self) -> None:
        while not self.stop.is_set():
            metrics.LEADER.set(1 if self.gate is None or self.gate.is_set() else 0)
            if not self.leading():
                self.stop.wait(0.2)
                continue
            key = self.queue.get(self.stop)
            if key is None:
                continue
            if self.leading():
                self.process(key)
            else:
                self.queue.add(key)  # the lease went while waiting: the next leader's work

    def _progress_loop(self) -> None:
        while not self.stop.wait(self.progress_every):
            if not self.leading():
                continue
            for key, target in list(self.targets.items()):
                try:
                    patch = progress_patch(target, self.clock())
                    if patch is not None:
                        self.cluster().write_status(key[0], key[1], patch, None)
                        merged = {**target.status, **{k: v for k, v in patch.items() if k != "progress"},
                                  "progress": {k: v for k, v in {**(target.status.get("progress") or {}),
                                                                  **patch["progress"]}.items() if v is not None}}  # fmt: skip
                        self.targets[key] = ProgressTarget(target.url, target.checkpoint_uri, merged)
                except Exception as e:  # a progress write never stops the controller
                    log.debug("%s/%s: progress not written: %s", key[0], key[1], e)


CONTROLLER: Controller | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global CONTROLLER
    settings.peering.standalone = True
    # Watching named namespaces needs no list of namespaces or CRDs: Kopf's scanning of both is
    # cluster-wide, which a namespaced install (Roles only) may not do; refused, it retried for
    # about a minute before every start. The PretrainJob CRD is found by API discovery instead.
    settings.scanning.disabled = bool(STATE.namespaces)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    cluster = _cluster()
    children = ChildCache()
    CONTROLLER = Controller(lambda: cluster, _now, RECONCILE_INTERVAL, PROGRESS_INTERVAL, STATE.gate, children)
    controller = CONTROLLER
    children.notify = controller.child_event
    from pretrain.operator.cluster import KubeCluster

    if not isinstance(cluster, KubeCluster):
        raise RuntimeError("the operator needs a KubeCluster (its API client feeds the caches)")
    start_reflectors(children, cluster.api, STATE.namespaces, controller.stop)
    controller.start()


@kopf.on.cleanup()
def stop_controller(**_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.shutdown()


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_changed(event: Mapping[str, Any], namespace: str | None, name: str, **_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.job_event(str(event.get("type") or "ADDED"), namespace or "default", name)
