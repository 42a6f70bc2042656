"""Kopf handlers, kept thin: read the job, ask the planner, apply the plan, patch the status.

Tests call these functions with the keyword arguments Kopf passes, over an `InMemoryCluster`;
`pretrain operator` runs them under Kopf with a `KubeCluster`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from pretrain.api.spec import GROUP, PLURAL, VERSION, Phase, PretrainJob
from pretrain.api.validation import SpecError, parse_spec
from pretrain.operator import metrics
from pretrain.operator.cluster import AlreadyExists, Cluster, Conflict, NotFound
from pretrain.operator.planner import Plan, plan
from pretrain.operator.progress import evaluation_from, progress_from, scrape

log = logging.getLogger("pretrain.operator")

#: Seconds between level-triggered reconciles of every job (also on create/update/resume).
#: `pretrain operator --reconcile-interval` sets it (through the environment: Kopf reads timer
#: intervals when this module is imported).
RECONCILE_INTERVAL = float(os.environ.get("PRETRAIN_RECONCILE_INTERVAL", "5"))
#: Seconds between progress scrapes of node 0's metrics endpoint (`--progress-interval`).
PROGRESS_INTERVAL = float(os.environ.get("PRETRAIN_PROGRESS_INTERVAL", "30"))


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0, tzinfo=None)


class _State:
    cluster: Cluster | None = None
    clock: Callable[[], datetime] = staticmethod(_utcnow)


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


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _job_lock(namespace: str, name: str) -> threading.Lock:
    """Kopf runs a job's handlers (create, update, timers) concurrently: reconciles of one job
    take turns, each with its own fresh read."""
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


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


def plan_for(body: Mapping[str, Any], cluster: Cluster, now: datetime) -> Plan:
    """Observe the job's children and plan, from `body` as read from the API."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    job, invalid = job_from(body)
    return plan(
        job, name=name, namespace=namespace, uid=meta.get("uid", ""), generation=meta.get("generation"),
        status=_plain(body.get("status")) or {}, observed=cluster.observe(namespace, name), now=now, invalid=invalid,
    )  # fmt: skip


def apply_plan(body: Mapping[str, Any], p: Plan, cluster: Cluster) -> None:
    """Write the planned status first, fenced by the resourceVersion the plan was made from, then
    act. A reconcile whose view went stale (another reconcile, or any writer, changed the job
    since) gets Conflict before it touches a pod; the pods of a new attempt are created only once
    the attempt number is stored, so no crash can leave pods the status does not know of."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace") or "default", meta.get("uid", "")
    old = _plain(body.get("status")) or {}
    change = status_patch(old, p.status)
    if change:
        cluster.write_status(namespace, name, change, meta.get("resourceVersion", ""))
    for obj in p.create:
        with contextlib.suppress(AlreadyExists):  # creation is idempotent
            cluster.create(obj)
    for obj in p.replace:
        cluster.replace(obj)
    for kind, child in p.delete:
        with contextlib.suppress(NotFound):
            cluster.delete(kind, namespace, child)
    for ev in p.events:
        cluster.event(namespace, name, uid, ev)
        log.info("%s/%s: %s %s: %s", namespace, name, ev.type, ev.reason, ev.message)
    if p.status.get("restarts", 0) > old.get("restarts", 0):
        metrics.RESTARTS.labels(namespace).inc()
    metrics.observe_phase(namespace, name, p.status.get("phase"))


def reconcile_job(namespace: str, name: str, cluster: Cluster, now: datetime) -> Plan | None:
    """One reconcile of one job: read it fresh from the API, observe, plan, apply.
    None when the job is gone or being deleted (its children go with it)."""
    body = cluster.read_job(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    p = plan_for(body, cluster, now)
    apply_plan(body, p, cluster)
    return p


def status_patch(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` status into `new` (removed keys become None)."""
    old = _plain(old) or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = "pretrain.io/finalizer"
    settings.watching.server_timeout = 300


# One level-triggered reconcile behind every trigger, each with an id of its own (Kopf keeps
# per-handler progress under its id).
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-on-create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-on-update")
@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-on-resume")
@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL, sharp=False, id="reconcile-timer")
def reconcile(body: Mapping[str, Any], **_: Any) -> None:
    meta = body["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    t0 = time.perf_counter()
    try:
        with _job_lock(namespace, name):  # one reconcile of a job at a time in this process
            reconcile_job(namespace, name, _cluster(), _now())
    except Conflict:
        # Someone wrote the job between our read and our status write: nothing was done; read again soon.
        raise kopf.TemporaryError("the job changed while it was reconciled; again with a fresh read", delay=1) from None
    except Exception:
        metrics.ERRORS.labels(namespace).inc()
        raise  # Kopf retries with backoff
    finally:
        metrics.RECONCILE.observe(time.perf_counter() - t0)


@kopf.timer(GROUP, VERSION, PLURAL, interval=PROGRESS_INTERVAL, sharp=False)
def progress(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Copy node 0's step, loss, tokens/s, ETA and last checkpoint into the status."""
    status = _plain(body.get("status")) or {}
    if status.get("phase") not in (Phase.RUNNING.value, Phase.PENDING.value):
        return
    job, _invalid = job_from(body)
    if job is None:
        return
    namespace = body["metadata"].get("namespace") or "default"
    node0 = [p for p in _cluster().observe(namespace, job.metadata.name).pods
             if p.attempt == status.get("attempt") and p.rank == 0 and p.phase == "Running" and p.ip]  # fmt: skip
    if not node0:
        return
    url = f"http://{node0[0].ip}:{job.spec.monitoring.metrics_port}/metrics"
    try:
        samples = scrape(url)
    except OSError as e:  # a failed scrape keeps the old values and never fails the job
        log.debug("progress scrape of %s failed: %s", url, e)
        return
    if "pretrain_step" not in samples:
        return
    prog, ckpt = progress_from(samples, _now())
    # A merge patch merges into the old progress: fields this scrape lacks are cleared explicitly.
    patch.status["progress"] = {**{k: None for k in status.get("progress") or {} if k not in prog}, **prog}
    evaluation = evaluation_from(samples)
    if evaluation:
        patch.status["evaluation"] = evaluation
    if ckpt is not None:
        uri = job.spec.checkpoint.uri
        if uri:
            ckpt["uri"] = f"{uri.rstrip('/')}/step-{ckpt['step']:08d}"
        patch.status["lastCheckpoint"] = ckpt
