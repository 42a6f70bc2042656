"""The Kopf app, kept thin: Kopf's watch of the jobs feeds the controller (`controller.py`), which
reconciles one job at a time (`reconcile.py`) and scrapes progress (`progress.py`).

No Kopf timers and no changing handlers: Kopf then puts no finalizer and no annotations on the
jobs, so deleting a job never waits for the operator (owner references take the children, with
the operator running or not). What timers did is the queue's: every job is requeued after
`resync` seconds, and sooner when its plan says so (backoff expiry, scheduling timeout, deadline,
TTL: `Plan.requeue_after`). A pod failure reaches the planner within a watch event's latency.

The only module state is the app's settings (`SETTINGS`, which `pretrain operator` fills before
Kopf starts) and the controller Kopf's startup hook makes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from pretrain.api.spec import GROUP, PLURAL, VERSION
from pretrain.operator.controller import Controller
from pretrain.operator.informer import ChildCache, start_reflectors

#: Seconds between level-triggered reconciles of a job with nothing happening (the safety net:
#: events drive the rest). `pretrain operator --reconcile-interval` sets it.
RECONCILE_INTERVAL = float(os.environ.get("PRETRAIN_RECONCILE_INTERVAL", "300"))
#: Seconds between progress scrapes of a running job's node 0 (`--progress-interval`).
PROGRESS_INTERVAL = float(os.environ.get("PRETRAIN_PROGRESS_INTERVAL", "60"))


def utcnow() -> datetime:
    """The controller's clock: UTC, whole seconds, naive (as the planner compares times)."""
    return datetime.now(UTC).replace(microsecond=0, tzinfo=None)


@dataclass
class AppSettings:
    """What `pretrain operator` decides before Kopf starts."""

    #: Namespaces the operator watches (empty: the whole cluster).
    namespaces: list[str] = field(default_factory=list)
    #: Set while this replica may act (it holds the leader lease); None: no leader election.
    gate: threading.Event | None = None


SETTINGS = AppSettings()
CONTROLLER: Controller | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global CONTROLLER
    settings.peering.standalone = True
    # Watching named namespaces needs no list of namespaces or CRDs: Kopf's scanning of both is
    # cluster-wide, which a namespaced install (Roles only) may not do; refused, it retried for
    # about a minute before every start. The PretrainJob CRD is found by API discovery instead.
    settings.scanning.disabled = bool(SETTINGS.namespaces)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    from pretrain.operator.cluster import KubeCluster

    cluster = KubeCluster()
    children = ChildCache()
    CONTROLLER = Controller(lambda: cluster, utcnow, RECONCILE_INTERVAL, PROGRESS_INTERVAL, SETTINGS.gate, children)
    controller = CONTROLLER
    children.notify = controller.child_event
    start_reflectors(children, cluster.api, SETTINGS.namespaces, controller.stop)
    controller.start()


@kopf.on.cleanup()
def stop_controller(**_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.shutdown()


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_changed(event: Mapping[str, Any], namespace: str | None, name: str, **_: Any) -> None:
    if CONTROLLER is not None:
        CONTROLLER.job_event(str(event.get("type") or "ADDED"), namespace or "default", name)
