"""The small cluster interface the operator needs, with two implementations: `KubeCluster` over
the official `kubernetes` client, and `InMemoryCluster` for tests (no apiserver runs here).

Every API call the operator makes goes through `Cluster`; `API_CALLS` lists them as RBAC rules,
and the Helm chart's ClusterRole is checked against it.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pretrain.api.spec import GROUP, PLURAL, VERSION
from pretrain.operator.children import CONFIG_KEY, LABEL_JOB, configmap_name, controller_uid, service_name
from pretrain.operator.nodes import node_fault, node_view
from pretrain.operator.planner import Event, Observed, pod_view
from pretrain.operator.preparation import PrepareView, prepare_job_name, prepare_view
from pretrain.timestamps import rfc3339

#: (apiGroup, resource, verbs) of every call below: the operator's least privilege.
API_CALLS: list[tuple[str, str, list[str]]] = [
    # patch: spec.runPolicy.suspend (schedulingTimeoutAction Suspend); delete: ttlSecondsAfterFinished
    # list: the jobs of a namespace whose preparation stage made a dataset another job can reuse
    (GROUP, PLURAL, ["get", "list", "patch", "delete"]),
    (GROUP, f"{PLURAL}/status", ["patch"]),
    ("", "pods", ["create", "delete", "list"]),
    # Services, ConfigMaps and PodMonitors go with their job (owner references): never deleted here.
    ("", "services", ["create", "get"]),
    ("", "configmaps", ["create", "get", "update"]),
    ("", "events", ["create"]),
    ("monitoring.coreos.com", "podmonitors", ["create", "get"]),
    # the data preparation stage (data.prepare): created, read, deleted once it completed
    ("batch", "jobs", ["create", "delete", "get"]),
    # resources.schedulerName volcano: a PodGroup per attempt, deleted when the next one starts
    ("scheduling.volcano.sh", "podgroups", ["create", "delete"]),
]


def prepared_by(jobs: list[dict[str, Any]]) -> dict[str, str]:
    """Preparation key -> the name of a job whose preparation stage completed with it."""
    out: dict[str, str] = {}
    for job in jobs:
        prep = (job.get("status") or {}).get("preparation") or {}
        if prep.get("done") and prep.get("key") and not prep.get("reusedFrom"):
            out.setdefault(str(prep["key"]), str(job["metadata"]["name"]))
    return out


class Cluster(Protocol):
    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def prepared_datasets(self, namespace: str) -> dict[str, str]: ...
    def write_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None) -> None: ...
    def suspend_job(self, namespace: str, name: str) -> None: ...
    def delete_job(self, namespace: str, name: str, uid: str) -> None: ...
    def observe(self, namespace: str, job: str, pod_monitor: bool = True, prepare: bool = False) -> Observed: ...
    def pod_monitor_exists(self, namespace: str, job: str) -> bool: ...
    def create(self, obj: dict[str, Any]) -> None: ...
    def replace(self, obj: dict[str, Any]) -> None: ...
    def delete(self, kind: str, namespace: str, name: str, grace: int | None = None) -> None: ...
    def event(self, namespace: str, job: str, uid: str, event: Event) -> None: ...


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


class AlreadyExists(Exception):
    pass


def api_error(e: BaseException) -> tuple[str, str]:
    """(reason, message) of an error: the API server's Status when it sent one (reason such as
    Forbidden or Invalid, and its message), else the exception's type and text."""
    import json

    body = getattr(e, "body", None)
    if body:
        try:
            status = json.loads(body)
            return str(status.get("reason") or type(e).__name__), str(status.get("message") or e)
        except (ValueError, AttributeError):
            pass
    return type(e).__name__, str(e)


class Conflict(Exception):
    """The object changed since it was read (409): the write did not happen."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies one."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class NotFound(Exception):
    pass


def load_config() -> str:
    """Load the in-cluster config (a pod's service account), else the kubeconfig; returns the
    namespace the operator runs in: the pod's own, else the kubeconfig context's, else default."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        with open(path) as f:
            return f.read().strip() or "default"
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    except OSError:
        return "default"
    try:
        _, context = kubernetes.config.list_kube_config_contexts()
        return str(context["context"].get("namespace") or "default")
    except (kubernetes.config.ConfigException, KeyError, TypeError):
        return "default"


class KubeCluster:
    """The real adapter: thin calls on the `kubernetes` client. 409 on create and 404 on delete
    become `AlreadyExists` and `NotFound`, as in `InMemoryCluster` (the handlers treat both as
    done); every other API error goes to the caller (Kopf retries a handler that raises)."""

    def __init__(self, api_client: Any = None) -> None:
        import kubernetes

        if api_client is None:
            load_config()
            api_client = kubernetes.client.ApiClient()
        self.k = kubernetes
        self.api = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)

    def _read(self, read: Any, *args: Any, **kwargs: Any) -> Any:
        """The object, or None when the API says 404 (403 too for a PodMonitor: its CRD absent
        or not granted means there is none to see)."""
        try:
            return read(*args, **kwargs)
        except self.k.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self._read(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        return dict(job) if job is not None else None

    def prepared_datasets(self, namespace: str) -> dict[str, str]:
        listed: Any = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return prepared_by(list(listed.get("items") or []))

    def write_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None) -> None:
        """A merge patch of /status; a given resourceVersion is a precondition (409 if it moved on)."""
        body: dict[str, Any] = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
        except self.k.client.ApiException as e:
            if e.status == 409:
                raise Conflict(f"PretrainJob {name} changed since it was read") from e
            if e.status == 404:
                raise NotFound(f"PretrainJob {name} not found") from e
            raise

    def suspend_job(self, namespace: str, name: str) -> None:
        """Set spec.runPolicy.suspend (a merge patch of the job itself, as Kueue suspends Jobs)."""
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       {"spec": {"runPolicy": {"suspend": True}}})  # fmt: skip
        except self.k.client.ApiException as e:
            if e.status == 404:
                raise NotFound(f"PretrainJob {name} not found") from e
            raise

    def observe(self, namespace: str, job: str, pod_monitor: bool = True, prepare: bool = False) -> Observed:
        # Raw JSON (`_preload_content=False`): building the client's typed models of every pod
        # only to turn them back into dicts cost more than the request itself.
        raw: Any = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={job}", _preload_content=False)
        pods = json.loads(raw.data)["items"]
        cm = self._read(self.core.read_namespaced_config_map, configmap_name(job), namespace, _preload_content=False)
        svc = self._read(self.core.read_namespaced_service, service_name(job), namespace, _preload_content=False)
        cm_obj = json.loads(cm.data) if cm is not None else None
        svc_obj = json.loads(svc.data) if svc is not None else None
        return Observed(
            pods=[pod_view(p) for p in pods],
            service=svc is not None,
            configmap=cm is not None,
            pod_monitor=self.pod_monitor_exists(namespace, job) if pod_monitor else False,
            config=(cm_obj.get("data") or {}).get(CONFIG_KEY) if cm_obj else None,
            service_owner=controller_uid(svc_obj["metadata"]) if svc_obj else None,
            configmap_owner=controller_uid(cm_obj["metadata"]) if cm_obj else None,
            prepare_job=self._prepare_job(namespace, job) if prepare else None,
        )

    def _prepare_job(self, namespace: str, job: str) -> PrepareView | None:
        found = self._read(self.batch.read_namespaced_job, prepare_job_name(job), namespace, _preload_content=False)
        return prepare_view(json.loads(found.data)) if found is not None else None

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the job itself, only the incarnation planned for (uid precondition); its
        children go by their owner references."""
        body = self.k.client.V1DeleteOptions(propagation_policy="Background",
                                             preconditions=self.k.client.V1Preconditions(uid=uid))  # fmt: skip
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body)
        except self.k.client.ApiException as e:
            if e.status in (404, 409):  # gone, or a new job of the same name (the precondition failed)
                raise NotFound(f"PretrainJob {name} not found") from e
            raise

    def pod_monitor_exists(self, namespace: str, job: str) -> bool:
        try:
            self.custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "podmonitors", job)
            return True
        except self.k.client.ApiException as e:
            if e.status in (403, 404):  # no such object, or the Prometheus Operator is not installed
                return False
            raise

    def replace(self, obj: dict[str, Any]) -> None:
        if obj["kind"] != "ConfigMap":
            raise ValueError(f"the operator does not update {obj['kind']}")
        body: Any = obj
        try:
            self.core.replace_namespaced_config_map(obj["metadata"]["name"], obj["metadata"]["namespace"], body)
        except self.k.client.ApiException as e:
            if e.status == 404:
                raise NotFound(f"ConfigMap {obj['metadata']['name']} not found") from e
            raise

    def create(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        kind = obj["kind"]
        body: Any = obj  # the client serialises plain dicts as they are
        try:
            if kind == "Pod":
                self.core.create_namespaced_pod(ns, body)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, body)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, body)
            elif kind == "PodMonitor":
                self.custom.create_namespaced_custom_object("monitoring.coreos.com", "v1", ns, "podmonitors", obj)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, body)
            elif kind == "PodGroup":
                self.custom.create_namespaced_custom_object("scheduling.volcano.sh", "v1beta1", ns, "podgroups", obj)
            else:
                raise ValueError(f"the operator does not create {kind}")
        except self.k.client.ApiException as e:
            if e.status == 409:
                raise AlreadyExists(f"{kind} {obj['metadata']['name']} already exists") from e
            if e.status == 404:  # the resource type (a CRD not installed) or the namespace is missing
                raise NotFound(f"{kind}: {api_error(e)[1]}") from e
            raise

    def delete(self, kind: str, namespace: str, name: str, grace: int | None = None) -> None:
        """Delete (Background propagation); `grace` 0 forces a pod out of the API at once."""
        body = self.k.client.V1DeleteOptions(propagation_policy="Background", grace_period_seconds=grace)
        try:
            if kind == "Pod":
                self.core.delete_namespaced_pod(name, namespace, body=body)
            elif kind == "Service":
                self.core.delete_namespaced_service(name, namespace, body=body)
            elif kind == "ConfigMap":
                self.core.delete_namespaced_config_map(name, namespace, body=body)
            elif kind == "PodMonitor":
                self.custom.delete_namespaced_custom_object(
                    "monitoring.coreos.com", "v1", namespace, "podmonitors", name, body=body
                )
            elif kind == "Job":  # Background: through the API a Job's pods are orphaned by default
                self.batch.delete_namespaced_job(name, namespace, body=body)
            elif kind == "PodGroup":
                self.custom.delete_namespaced_custom_object(
                    "scheduling.volcano.sh", "v1beta1", namespace, "podgroups", name, body=body
                )
            else:
                raise ValueError(f"the operator does not delete {kind}")
        except self.k.client.ApiException as e:
            if e.status == 404:
                raise NotFound(f"{kind} {name} not found") from e
            raise

    def event(self, namespace: str, job: str, uid: str, event: Event) -> None:
        from datetime import UTC

        now = datetime.now(UTC)
        ev = self.k.client.CoreV1Event(
            metadata=self.k.client.V1ObjectMeta(generate_name=f"{job}.", namespace=namespace),
            involved_object=self.k.client.V1ObjectReference(
                api_version="pretrain.io/v1alpha1", kind="PretrainJob", name=job, namespace=namespace, uid=uid
            ),
            type=event.type, reason=event.reason, message=event.message[:1024], first_timestamp=now,
            last_timestamp=now, count=1, source=self.k.client.V1EventSource(component="pretrain-operator"),
            reporting_component="pretrain-operator", reporting_instance="pretrain-operator",
        )  # fmt: skip
        self.core.create_namespaced_event(namespace, ev)
