"""Leader election over a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Several operator replicas may run (a rolling update, or two for availability); one leads and
reconciles, the others keep their watches warm and wait. The leader renews the Lease every
`retry_period`; a candidate takes it over only once the record it last saw has stayed unchanged
for `lease_duration` *by its own clock* (no trust in another machine's clock). A leader that cannot
renew within `renew_deadline` stops acting at once and exits, so that a fresh process stands by:
it never goes on reconciling without the lease. On a clean shutdown the leader releases the
Lease (empty holder) so that a standby takes over within one retry period, not a lease duration.

`next_record` is the pure decision; `LeaseLock` is the thin adapter over the API; `LeaderElector`
runs the loop in a thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pretrain.operator.cluster import AlreadyExists, Conflict
from pretrain.timestamps import micro_time

log = logging.getLogger("pretrain.operator.leader")


@dataclass(frozen=True)
class Timing:
    """client-go's defaults; tests shorten them."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # "" when released
    duration: int  # seconds
    acquire_time: str
    renew_time: str
    transitions: int = 0


def next_record(current: LeaseRecord | None, me: str, now: str, expired: bool, duration: int) -> LeaseRecord | None:
    """The record to write to take or keep the lease, or None while another holds it.

    `expired`: the current record has not changed for its duration, as this candidate saw it."""
    if current is None:
        return LeaseRecord(me, duration, now, now, 0)
    if current.holder == me:
        return replace(current, duration=duration, renew_time=now)
    if current.holder and not expired:
        return None
    return LeaseRecord(me, duration, now, now, current.transitions + 1)


class LeaseStore(Protocol):
    def get(self) -> tuple[LeaseRecord, str] | None: ...  # (record, resourceVersion)
    def create(self, record: LeaseRecord) -> str: ...  # raises AlreadyExists
    def update(self, record: LeaseRecord, resource_version: str) -> str: ...  # raises Conflict


class LeaseLock:
    """One Lease object through the `kubernetes` client (raw JSON in, dicts out)."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        import kubernetes

        self.k = kubernetes
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name

    def _body(self, record: LeaseRecord, resource_version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": {
            "holderIdentity": record.holder, "leaseDurationSeconds": record.duration,
            "acquireTime": record.acquire_time, "renewTime": record.renew_time,
            "leaseTransitions": record.transitions}}  # fmt: skip

    def get(self) -> tuple[LeaseRecord, str] | None:
        import json

        try:
            raw: Any = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
        except self.k.client.ApiException as e:
            if e.status == 404:
                return None
            raise
        obj = json.loads(raw.data)
        spec = obj.get("spec") or {}
        record = LeaseRecord(str(spec.get("holderIdentity") or ""), int(spec.get("leaseDurationSeconds") or 0),
                             str(spec.get("acquireTime") or ""), str(spec.get("renewTime") or ""),
                             int(spec.get("leaseTransitions") or 0))  # fmt: skip
        return record, str(obj["metadata"]["resourceVersion"])

    def _write(self, call: Callable[..., Any], *args: Any) -> str:
        import json

        try:
            raw: Any = call(*args, _preload_content=False)
        except self.k.client.ApiException as e:
            if e.status == 409:
                raise (Conflict if call == self.api.replace_namespaced_lease else AlreadyExists)(str(e.reason)) from e
            raise
        return str(json.loads(raw.data)["metadata"]["resourceVersion"])

    def create(self, record: LeaseRecord) -> str:
        return self._write(self.api.create_namespaced_lease, self.namespace, self._body(record))

    def update(self, record: LeaseRecord, resource_version: str) -> str:
        return self._write(self.api.replace_namespaced_lease, self.name, self.namespace,
                           self._body(record, resource_version))  # fmt: skip


class LeaderElector:
    """Acquire, then keep, the lease; `leading` is set exactly while this process may act."""

    def __init__(self, store: LeaseStore, identity: str, timing: Timing = Timing(),
                 on_lost: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.store, self.identity, self.timing = store, identity, timing
        self.on_lost = on_lost or (lambda: None)
        self.leading = threading.Event()
        self.lost = False
        self._stop = threading.Event()
        self._observed: tuple[LeaseRecord, str] | None = None
        self._observed_at = 0.0  # monotonic time the observed record last changed
        self._thread: threading.Thread | None = None

    def try_acquire_or_renew(self) -> bool:
        """One round: read the lease, write ours if `next_record` says so. True when we hold it."""
        now_mono = time.monotonic()
        seen = self.store.get()
        if seen != self._observed:
            self._observed, self._observed_at = seen, now_mono
        current = seen[0] if seen else None
        expired = current is not None and now_mono - self._observed_at > (current.duration or 0)
        record = next_record(current, self.identity, micro_time(datetime.now(UTC)), expired,
                             math.ceil(self.timing.lease_duration))  # fmt: skip
        if record is None:
            return False
        try:
            rv = self.store.update(record, seen[1]) if seen else self.store.create(record)
        except (Conflict, AlreadyExists):
            return False  # someone else wrote it first
        self._observed, self._observed_at = (record, rv), time.monotonic()
        if current is None or current.holder != self.identity:
            log.info("%s acquired the lease (transition %d)", self.identity, record.transitions)
        return True

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except Exception as e:  # an API error is one failed round, not the end of the loop
            log.warning("leader election: %s: %s", type(e).__name__, e)
            return False

    def run(self) -> None:
        t = self.timing
        while not self._stop.is_set() and not self._attempt():
            self._stop.wait(t.retry_period)
        if self._stop.is_set():
            return
        self.leading.set()
        last_renew = time.monotonic()
        while not self._stop.wait(t.retry_period):
            if self._attempt():
                last_renew = time.monotonic()
            elif time.monotonic() - last_renew > t.renew_deadline:
                self.leading.clear()
                self.lost = True
                log.error("%s lost the lease (no renewal for %.0fs); stopping", self.identity, t.renew_deadline)
                self.on_lost()
                return

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop; a leader gives the lease up (empty holder) so a standby need not wait it out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timing.retry_period + 5)
        if release and self.leading.is_set():
            self.leading.clear()
            try:
                seen = self.store.get()
                if seen and seen[0].holder == self.identity:
                    now = micro_time(datetime.now(UTC))
                    self.store.update(replace(seen[0], holder="", duration=1, renew_time=now), seen[1])
                    log.info("%s released the lease", self.identity)
            except Exception as e:
                log.warning("could not release the lease: %s", e)


class NotLeading(Exception):
    """A write refused because this replica no longer holds the lease: nothing was written."""


class FencedCluster:
    """A `Cluster` whose writes go through only while `gate` is set (the lease is held).

    The worker checks the gate before each reconcile, but a reconcile already running when the
    lease goes would write on (a deposed leader once reconciled 56 ms after "lost the lease").
    Each write checks again, so at most the one write already sent when the gate clears lands,
    inside the margin client-go keeps between the renew deadline and the lease duration."""

    _WRITES = frozenset({"write_status", "suspend_job", "delete_job", "create", "replace", "delete", "event"})

    def __init__(self, inner: Any, gate: threading.Event) -> None:
        self._inner, self._gate = inner, gate

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._WRITES:
            return attr

        def fenced(*args: Any, **kwargs: Any) -> Any:
            if not self._gate.is_set():
                raise NotLeading(f"{name}: the leader lease is not held; not written")
            return attr(*args, **kwargs)

        return fenced
