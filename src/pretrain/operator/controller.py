"""The controller: the work queue, its one worker and the progress loop, fed by watch events.

A job's key enters the queue on any event of the job or of its children (informer.py's caches
call `child_event`), and again after `resync` seconds or sooner when its plan says so
(`Plan.requeue_after`). One worker takes keys one at a time and reconciles (`reconcile.py`); a
failed reconcile is retried with backoff, a Conflict at once (someone wrote the job meanwhile).
Under leader election nothing is done while the gate is clear, and every write is fenced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import cast

from pretrain.operator import metrics
from pretrain.operator.cluster import Cluster, Conflict
from pretrain.operator.informer import ChildCache
from pretrain.operator.leader import FencedCluster, NotLeading
from pretrain.operator.progress import ProgressTarget, progress_patch, progress_target
from pretrain.operator.reconcile import Observer, cached_observer, observe_for, reconcile
from pretrain.operator.workqueue import WorkQueue

log = logging.getLogger("pretrain.operator")


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
