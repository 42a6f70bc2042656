"""Kopf handlers, kept thin: read the job, ask the planner, apply the plan, patch the status.

Tests call these functions with the keyword arguments Kopf passes, over an `InMemoryCluster`;
`pretrain operator` runs them under Kopf with a `KubeCluster`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from pretrain.api.spec import GROUP, PLURAL, VERSION, Phase, PretrainJob
from pretrain.api.validation import SpecError, parse_spec
from pretrain.operator import metrics
from pretrain.operator.cluster import AlreadyExists, Cluster, NotFound
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


def reconcile_body(body: Mapping[str, Any], cluster: Cluster, now: datetime) -> Plan:
    """One reconcile of one job: observe, plan, apply. Returns the plan (status included)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace") or "default", meta.get("uid", "")
    job, invalid = job_from(body)
    old = _plain(body.get("status")) or {}
    p = plan(
        job, name=name, namespace=namespace, uid=uid, generation=meta.get("generation"), status=old,
        observed=cluster.observe(namespace, name), now=now, invalid=invalid,
    )  # fmt: skip
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
def reconcile(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    namespace = body["metadata"].get("namespace") or "default"
    t0 = time.perf_counter()
    try:
        p = reconcile_body(body, _cluster(), _now())
    except Exception:
        metrics.ERRORS.labels(namespace).inc()
        raise  # Kopf retries with backoff
    finally:
        metrics.RECONCILE.observe(time.perf_counter() - t0)
    patch.status.update(status_patch(body.get("status"), p.status))


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
