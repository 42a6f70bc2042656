"""One reconcile of one job, with nothing global: read it fresh, observe its children, plan,
write the status fenced by the resourceVersion it read, then act. The cluster and the time are
arguments; the controller (`controller.py`) calls it from its worker, the tests over an in-memory
cluster (tests/operator/memory_cluster.py) with a fake clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from typing import Any

from pretrain.api.spec import PretrainJob
from pretrain.api.validation import SpecError, parse_spec
from pretrain.operator import metrics
from pretrain.operator.cluster import AlreadyExists, Cluster, NotFound, api_error
from pretrain.operator.informer import ChildCache
from pretrain.operator.planner import Event, Observed, Plan, plan, set_condition

log = logging.getLogger("pretrain.operator")


def plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=dict)) if x is not None else None


def job_from(body: Mapping[str, Any]) -> tuple[PretrainJob | None, str | None]:
    meta = body["metadata"]
    try:
        spec = parse_spec(plain(body.get("spec")) or {})
    except SpecError as e:
        return None, str(e)
    return PretrainJob(metadata={"name": meta["name"], "namespace": meta.get("namespace")}, spec=spec), None


def plan_for(body: Mapping[str, Any], job: PretrainJob | None, invalid: str | None, observed: Observed,
             now: datetime) -> Plan:  # fmt: skip
    """The plan for `body` (as read from the API, maybe a while ago) and what was observed."""
    meta = body["metadata"]
    return plan(job, name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""),
                generation=meta.get("generation"), status=plain(body.get("status")) or {}, observed=observed,
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


def apply_plan(body: Mapping[str, Any], p: Plan, cluster: Cluster, now: datetime) -> None:
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
    old = plain(body.get("status")) or {}
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
    _report_conditions(namespace, name, uid, p.status, cluster, failures, monitor_missing, now)
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


def status_patch(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` status into `new` (removed keys become None)."""
    old = plain(old) or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
