"""A `Cluster` in memory, for the planner's and handlers' fast tests: objects in dicts, pods that
change phase only when a test (playing the kubelet) says so. It records the calls it gets, which
tests/test_chart.py turns into the RBAC the chart must grant. It lives with the tests: the
operator never runs on it; tests/operator/test_cluster_contract.py holds it to what the real
adapter (`KubeCluster`, through the API emulator) does.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pretrain.operator.children import CONFIG_KEY, LABEL_JOB, configmap_name, controller_uid, service_name
from pretrain.operator.cluster import AlreadyExists, Conflict, NotFound, merge_patch, prepared_by
from pretrain.operator.nodes import node_fault, node_view
from pretrain.operator.planner import Event, Observed, pod_view
from pretrain.operator.preparation import prepare_job_name, prepare_view
from pretrain.timestamps import rfc3339


@dataclass
class InMemoryCluster:
    """Objects in dicts; pods change phase only when a test (or a kubelet stand-in) says so."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # PretrainJobs, as the API holds them
    events: list[tuple[str, Event]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1))
    _ips: itertools.count[int] = field(default_factory=lambda: itertools.count(2))
    _rv: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store a PretrainJob (tests edit the returned dict as a user edits the object)."""
        body["metadata"].setdefault("resourceVersion", str(next(self._rv)))
        self.jobs[(body["metadata"].get("namespace") or "default", body["metadata"]["name"])] = body
        return body

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", "PretrainJob"))
        job = self.jobs.get((namespace, name))
        return copy.deepcopy(job) if job is not None else None

    def prepared_datasets(self, namespace: str) -> dict[str, str]:
        self.calls.append(("list", "PretrainJob"))
        return prepared_by([j for (ns, _), j in sorted(self.jobs.items()) if ns == namespace])

    def write_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None) -> None:
        """A JSON merge patch of the status, refused when the job changed since it was read
        (when `resource_version` is given)."""
        self.calls.append(("patch", "PretrainJob/status"))
        job = self.jobs.get((namespace, name))
        if job is None:
            raise NotFound(f"PretrainJob {name} not found")
        if resource_version is not None and job["metadata"].get("resourceVersion") != resource_version:
            raise Conflict(f"PretrainJob {name} changed since it was read")
        job["status"] = merge_patch(job.get("status") or {}, patch)
        job["metadata"]["resourceVersion"] = str(next(self._rv))

    def suspend_job(self, namespace: str, name: str) -> None:
        self.calls.append(("patch", "PretrainJob"))
        job = self.jobs.get((namespace, name))
        if job is None:
            raise NotFound(f"PretrainJob {name} not found")
        job["spec"] = merge_patch(job.get("spec") or {}, {"runPolicy": {"suspend": True}})
        job["metadata"]["resourceVersion"] = str(next(self._rv))
        job["metadata"]["generation"] = int(job["metadata"].get("generation") or 1) + 1

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """The job goes, and its children with it (the garbage collector's work, done here)."""
        self.calls.append(("delete", "PretrainJob"))
        job = self.jobs.get((namespace, name))
        if job is None or job["metadata"].get("uid") != uid:
            raise NotFound(f"PretrainJob {name} not found")
        del self.jobs[(namespace, name)]
        for key in [k for k, o in self.objects.items() if k[1] == namespace and controller_uid(o["metadata"]) == uid]:
            del self.objects[key]

    def observe(self, namespace: str, job: str, pod_monitor: bool = True, prepare: bool = False) -> Observed:
        # the same reads as KubeCluster.observe
        self.calls += [("list", "Pod"), ("get", "Service"), ("get", "ConfigMap")]
        if pod_monitor:
            self.calls.append(("get", "PodMonitor"))
        if prepare:
            self.calls.append(("get", "Job"))
        prep = self.objects.get(("Job", namespace, prepare_job_name(job))) if prepare else None
        pods = [
            pod_view(o) for (kind, ns, _), o in sorted(self.objects.items())
            if kind == "Pod" and ns == namespace and o["metadata"]["labels"].get(LABEL_JOB) == job
        ]  # fmt: skip
        svc = self.objects.get(("Service", namespace, service_name(job)))
        cm = self.objects.get(("ConfigMap", namespace, configmap_name(job)))
        bound = {p.node for p in pods if p.node}
        nodes = {n: node_view(o) for (kind, _, n), o in self.objects.items() if kind == "Node" and n in bound}
        return Observed(
            pods=pods,
            service=svc is not None,
            configmap=cm is not None,
            pod_monitor=pod_monitor and ("PodMonitor", namespace, job) in self.objects,
            config=(cm or {}).get("data", {}).get(CONFIG_KEY),
            service_owner=controller_uid(svc["metadata"]) if svc else None,
            configmap_owner=controller_uid(cm["metadata"]) if cm else None,
            prepare_job=prepare_view(prep) if prep else None,
            nodes=nodes,
        )

    def pod_monitor_exists(self, namespace: str, job: str) -> bool:
        self.calls.append(("get", "PodMonitor"))
        return ("PodMonitor", namespace, job) in self.objects

    def replace(self, obj: dict[str, Any]) -> None:
        self.calls.append(("update", obj["kind"]))
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key not in self.objects:
            raise NotFound(f"{obj['kind']} {obj['metadata']['name']} not found")
        meta = self.objects[key]["metadata"]
        self.objects[key] = {**copy.deepcopy(obj), "metadata": {**copy.deepcopy(obj["metadata"]), "uid": meta["uid"],
                                                                 "creationTimestamp": meta["creationTimestamp"]}}  # fmt: skip

    def create(self, obj: dict[str, Any]) -> None:
        kind, meta = obj["kind"], obj["metadata"]
        self.calls.append(("create", kind))
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            raise AlreadyExists(f"{kind} {meta['name']} already exists")
        stored = copy.deepcopy(obj)
        stored["metadata"]["creationTimestamp"] = rfc3339(self.now)
        stored["metadata"]["uid"] = f"uid-{meta['name']}"
        if kind == "Pod":
            stored["status"] = {"phase": "Pending"}
        self.objects[key] = stored

    def delete(self, kind: str, namespace: str, name: str, grace: int | None = None) -> None:
        self.calls.append(("delete", kind))
        key = (kind, namespace, name)
        if key not in self.objects:
            raise NotFound(f"{kind} {name} not found")
        if kind == "Pod" and grace != 0:  # pods terminate gracefully; `settle()` plays the kubelet finishing
            self.objects[key]["metadata"]["deletionTimestamp"] = rfc3339(self.now)
        else:
            del self.objects[key]

    def event(self, namespace: str, job: str, uid: str, event: Event) -> None:
        self.calls.append(("create", "Event"))
        self.events.append((job, event))

    # ---- test controls
    def set_job_status(self, name: str, *, complete: bool = False, failed: bool = False, succeeded: int = 0,
                       failed_indexes: str = "", namespace: str = "default") -> None:  # fmt: skip
        """What the Job controller writes on a preparation Job."""
        conds = [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m, on in (
            ("Complete", "CompletionsReached", "Reached expected number of succeeded pods", complete),
            ("Failed", "FailedIndexes", "Job has failed indexes", failed)) if on]  # fmt: skip
        self.objects[("Job", namespace, name)]["status"] = {
            "succeeded": succeeded, "failedIndexes": failed_indexes or None, "conditions": conds}  # fmt: skip

    def pods(self, namespace: str = "default") -> list[dict[str, Any]]:
        return [o for (k, ns, _), o in sorted(self.objects.items()) if k == "Pod" and ns == namespace]

    def set_phase(
        self, name: str, phase: str, exit_code: int | None = None, message: str = "", namespace: str = "default",
        *, reason: str | None = None, finished: str | None = None,
    ) -> None:  # fmt: skip
        """What a kubelet reports: the phase, and for an ended container its exit code, message,
        terminated reason (Error, OOMKilled) and finishedAt."""
        pod = self.objects[("Pod", namespace, name)]
        pod["status"]["phase"] = phase
        if phase == "Running":
            pod["status"].setdefault("podIP", f"10.0.0.{next(self._ips)}")
        if exit_code is not None:
            term: dict[str, Any] = {"exitCode": exit_code, "message": message}
            term.update({k: v for k, v in (("reason", reason), ("finishedAt", finished)) if v})
            pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]

    def disrupt(self, name: str, reason: str = "PreemptionByScheduler", at: str | None = None,
                namespace: str = "default") -> None:  # fmt: skip
        """What the scheduler, the eviction API or the taint manager do before deleting a pod: the
        DisruptionTarget condition, then a graceful deletion."""
        pod = self.objects[("Pod", namespace, name)]
        pod["status"].setdefault("conditions", []).append(
            {"type": "DisruptionTarget", "status": "True", "reason": reason, "lastTransitionTime": at}
        )
        pod["metadata"]["deletionTimestamp"] = at or "2026-01-01T00:00:00Z"

    def remove(self, name: str, namespace: str = "default") -> None:
        """A pod vanishing (node lost, evicted and garbage-collected)."""
        del self.objects[("Pod", namespace, name)]

    def set_node(self, name: str, ready: str = "True", **conditions: str) -> None:
        """A Node's conditions as its kubelet (Ready True), the node lifecycle controller
        (Ready Unknown: the kubelet stopped posting) or node-problem-detector write them."""
        since = rfc3339(self.now)
        reason = "KubeletReady" if ready == "True" else "NodeStatusUnknown"
        conds = [{"type": "Ready", "status": ready, "reason": reason, "lastTransitionTime": since}]
        conds += [{"type": t, "status": s, "reason": t, "lastTransitionTime": since} for t, s in conditions.items()]
        self.objects[("Node", "", name)] = {"metadata": {"name": name}, "status": {"conditions": conds}}

    def _kubelet_answers(self, pod: dict[str, Any]) -> bool:
        """A pod's kubelet can confirm its deletion: unbound, or its node is Ready."""
        node = self.objects.get(("Node", "", pod["spec"].get("nodeName") or ""))
        return node is None or node_fault(node_view(node), []) is None

    def settle(self) -> None:
        """Finish every graceful deletion a kubelet confirms: on a NotReady node none does, and
        the pod stays Terminating (until a deletion with grace 0)."""
        for key in [k for k, o in self.objects.items() if o["metadata"].get("deletionTimestamp")
                    and (k[0] != "Pod" or self._kubelet_answers(o))]:  # fmt: skip
            del self.objects[key]
