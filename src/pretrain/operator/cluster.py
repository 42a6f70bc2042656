"""The small cluster interface the operator needs, and `KubeCluster`, its implementation over the
official `kubernetes` client (the tests keep an in-memory one: tests/operator/memory_cluster.py).

Every API call the operator makes goes through `Cluster`; `API_CALLS` lists them as RBAC rules,
and the Helm chart's ClusterRole is checked against it.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from typing import Any, Protocol

from pretrain.api.spec import GROUP, PLURAL, VERSION
from pretrain.operator.children import CONFIG_KEY, LABEL_JOB, configmap_name, controller_uid, service_name
from pretrain.operator.planner import Event, Observed, pod_view
from pretrain.operator.preparation import PrepareView, prepare_job_name, prepare_view

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
