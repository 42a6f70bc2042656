"""A stand-in for kube-controller-manager's Job controller, for Indexed Jobs, through the API as
the real one works (list and watch, pods created with owner references, `jobs/status` written).

What it does as the real controller does, where the operator relies on it:
- one pod per pending index, up to `parallelism`: generateName `<job>-<index>-`, hostname
  `<job>-<index>`, the index in the `batch.kubernetes.io/job-completion-index` annotation and
  label and in `JOB_COMPLETION_INDEX` (a downward-API env var), the template's labels, a
  controller owner reference, and the `batch.kubernetes.io/job-tracking` finalizer, removed once
  the pod's end is counted;
- a succeeded pod completes its index (`status.completedIndexes`, "0-2,4" intervals; `succeeded`);
- a failed pod (or one gone before it ended) counts against `backoffLimitPerIndex` for its index
  (the replacement carries `batch.kubernetes.io/job-index-failure-count`), its index failing once
  over it (`status.failedIndexes`), or against `backoffLimit` for the whole Job; a replacement
  waits `backoff_seconds * 2^(failures-1)` (10 s in a cluster; tests shorten it);
- the end: conditions SuccessCriteriaMet then Complete, with `completionTime`, when every index
  completed; FailureTarget then Failed (BackoffLimitExceeded, or FailedIndexes once every index
  ended with some failed), active pods deleted;
- `status.active`, `status.ready`, `status.startTime`; `spec.suspend` deletes the active pods
  (condition Suspended).
Not done (not relied on): podFailurePolicy, successPolicy, activeDeadlineSeconds, NonIndexed Jobs'
own completion, pod replacement while terminating, elastic completions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kubeapi.batch import COMPLETION_INDEX, INDEX_FAILURE_COUNT, TRACKING_FINALIZER
from tests.loops import sync_until

log = logging.getLogger("tests.jobcontroller")
Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def intervals(indexes: set[int]) -> str:
    """`status.completedIndexes` form: "0-2,4"."""
    out, run = [], []
    for i in sorted(indexes):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_intervals(text: str | None) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@dataclass
class JobController:
    kubeconfig: Path
    namespace: str = "default"
    #: The first delay before a failed index's replacement (the real controller's is 10 s).
    backoff_seconds: float = 10.0
    errors: list[str] = field(default_factory=list)
    _failures: dict[tuple[str, int], int] = field(default_factory=dict)  # (job uid, index) -> failed pods
    _counted: set[str] = field(default_factory=set)  # pod uids whose end is counted
    _not_before: dict[tuple[str, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import kubernetes

        self.k = kubernetes
        self.client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-controller")

    def start(self) -> JobController:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        sync_until(self._stop, self.sync, self.errors, "job controller")

    def _plain(self, obj: Any) -> Obj:
        return dict(self.client.sanitize_for_serialization(obj))

    def sync(self) -> None:
        jobs = self._plain(self.batch.list_namespaced_job(self.namespace))["items"]
        pods = self._plain(self.core.list_namespaced_pod(self.namespace))["items"]
        for job in jobs:
            if job["spec"].get("completionMode") != "Indexed" or job["metadata"].get("deletionTimestamp"):
                continue
            uid = job["metadata"]["uid"]
            mine = [p for p in pods if any(r.get("uid") == uid and r.get("controller")
                                           for r in p["metadata"].get("ownerReferences") or [])]  # fmt: skip
            self.sync_job(job, mine)

    def sync_job(self, job: Obj, pods: list[Obj]) -> None:
        spec, status = job["spec"], dict(job.get("status") or {})
        if any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in status.get("conditions") or []):
            self._release(pods)
            return
        completed, failed = (
            parse_intervals(status.get("completedIndexes")),
            parse_intervals(status.get("failedIndexes")),
        )
        counts = {"succeeded": int(status.get("succeeded") or 0), "failed": int(status.get("failed") or 0)}
        for pod in pods:
            self._count(job, pod, completed, failed, counts)
        active = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")
                  and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        status.update(self._status(status, completed, failed, counts, active))
        verdict = self._verdict(spec, completed, failed, counts)
        if verdict is not None or spec.get("suspend"):
            for p in active:
                self._delete(p)
            active = []
        if verdict is None and not spec.get("suspend"):
            self._create_missing(job, completed | failed, {self._index(p) for p in active}, len(active))
        self._finish(status, verdict, bool(spec.get("suspend")))
        with contextlib.suppress(self.k.client.ApiException):
            self.batch.patch_namespaced_job_status(job["metadata"]["name"], self.namespace, {"status": status})
        self._release([p for p in pods if p["metadata"]["uid"] in self._counted])

    # ------------------------------------------------------------------ accounting

    @staticmethod
    def _index(pod: Obj) -> int:
        return int(pod["metadata"]["annotations"][COMPLETION_INDEX])

    def _count(self, job: Obj, pod: Obj, completed: set[int], failed: set[int], counts: dict[str, int]) -> None:
        """Count a pod's end once: its index completes, or its failure counts. A pod without the
        tracking finalizer was counted already (by this controller or an earlier one)."""
        puid, phase = pod["metadata"]["uid"], pod["status"].get("phase")
        gone = bool(pod["metadata"].get("deletionTimestamp")) and phase not in ("Succeeded", "Failed")
        tracked = TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or [])
        if puid in self._counted or not tracked or not (phase in ("Succeeded", "Failed") or gone):
            return
        self._counted.add(puid)
        index = self._index(pod)
        if phase == "Succeeded":
            completed.add(index)
            counts["succeeded"] += 1
            return
        counts["failed"] += 1
        key = (job["metadata"]["uid"], index)
        n = self._failures[key] = self._failures.get(key, 0) + 1
        limit = job["spec"].get("backoffLimitPerIndex")
        if limit is not None and n > int(limit):
            failed.add(index)
        self._not_before[key] = time.monotonic() + self.backoff_seconds * 2 ** (n - 1)

    @staticmethod
    def _status(old: Obj, completed: set[int], failed: set[int], counts: dict[str, int], active: list[Obj]) -> Obj:
        ready = sum(1 for p in active if any(c.get("type") == "Ready" and c.get("status") == "True"
                                             for c in p["status"].get("conditions") or []))  # fmt: skip
        return {"startTime": old.get("startTime") or _now(), "active": len(active), "ready": ready,
                "succeeded": counts["succeeded"], "failed": counts["failed"],
                "completedIndexes": intervals(completed), "failedIndexes": intervals(failed) or None,
                "uncountedTerminatedPods": {}}  # fmt: skip

    @staticmethod
    def _verdict(spec: Obj, completed: set[int], failed: set[int], counts: dict[str, int]) -> tuple[str, str] | None:
        n = int(spec["completions"])
        if len(completed) >= n:
            return ("Complete", "CompletionsReached")
        if spec.get("backoffLimitPerIndex") is None and counts["failed"] > int(spec.get("backoffLimit", 6)):
            return ("Failed", "BackoffLimitExceeded")
        if failed and len(completed | failed) >= n:
            return ("Failed", "FailedIndexes")
        return None

    def _finish(self, status: Obj, verdict: tuple[str, str] | None, suspended: bool) -> None:
        conds = [c for c in status.get("conditions") or [] if c["type"] != "Suspended"]
        if suspended:
            conds.append({"type": "Suspended", "status": "True", "reason": "JobSuspended",
                          "message": "Job suspended", "lastTransitionTime": _now()})  # fmt: skip
        if verdict is not None:
            kind, reason = verdict
            first = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
            message = {"CompletionsReached": "Reached expected number of succeeded pods",
                       "BackoffLimitExceeded": "Job has reached the specified backoff limit",
                       "FailedIndexes": "Job has failed indexes"}[reason]  # fmt: skip
            for t in (first, kind):
                conds.append({"type": t, "status": "True", "reason": reason, "message": message,
                              "lastTransitionTime": _now(), "lastProbeTime": _now()})  # fmt: skip
            if kind == "Complete":
                status["completionTime"] = _now()
        status["conditions"] = conds or None

    # ------------------------------------------------------------------ pods

    def _create_missing(self, job: Obj, ended: set[int], running: set[int], active: int) -> None:
        spec, uid = job["spec"], job["metadata"]["uid"]
        for index in range(int(spec["completions"])):
            if active >= int(spec.get("parallelism", 1)):
                return
            if index in ended or index in running or time.monotonic() < self._not_before.get((uid, index), 0.0):
                continue
            self.core.create_namespaced_pod(self.namespace, self._pod(job, index))
            active += 1

    def _pod(self, job: Obj, index: int) -> Obj:
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        template = job["spec"]["template"]
        meta = template.get("metadata") or {}
        spec = dict(template["spec"])
        env = {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{COMPLETION_INDEX}']"}}}  # fmt: skip
        spec["containers"] = [{**c, "env": [env, *(c.get("env") or [])]} for c in spec["containers"]]
        spec["hostname"] = f"{name}-{index}"
        annotations = {**(meta.get("annotations") or {}), COMPLETION_INDEX: str(index)}
        failures = self._failures.get((uid, index), 0)
        if failures:
            annotations[INDEX_FAILURE_COUNT] = str(failures)
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "generateName": f"{name}-{index}-", "labels": {**(meta.get("labels") or {}),
                                                                   COMPLETION_INDEX: str(index)},
                    "annotations": annotations, "finalizers": [TRACKING_FINALIZER],
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                                         "controller": True, "blockOwnerDeletion": True}]},
                "spec": spec}  # fmt: skip

    def _delete(self, pod: Obj) -> None:
        with contextlib.suppress(self.k.client.ApiException):
            self.core.delete_namespaced_pod(pod["metadata"]["name"], self.namespace)

    def _release(self, pods: list[Obj]) -> None:
        """Remove the tracking finalizer of counted pods (a JSON patch: in a strategic merge patch
        `finalizers` is a set, so a shorter list would not remove it)."""
        for p in pods:
            fins = p["metadata"].get("finalizers") or []
            if TRACKING_FINALIZER in fins:
                i = fins.index(TRACKING_FINALIZER)
                ops = [{"op": "test", "path": f"/metadata/finalizers/{i}", "value": TRACKING_FINALIZER},
                       {"op": "remove", "path": f"/metadata/finalizers/{i}"}]  # fmt: skip
                with contextlib.suppress(self.k.client.ApiException):
                    self.core.patch_namespaced_pod(p["metadata"]["name"], self.namespace, ops)
