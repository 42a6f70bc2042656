"""The objects a PretrainJob owns, as plain dicts: pure functions of the job (and the attempt).

Names are deterministic (`<job>` for the Service and ConfigMap, `<job>-a<attempt>-n<rank>` for
pods) and every object carries the job's labels and an owner reference, so the operator can
always find, adopt or delete what it made, whatever it remembers.
"""

from __future__ import annotations

import copy
from typing import Any

from pretrain.api.spec import API_VERSION, KIND, PretrainJob
from pretrain.contract import (
    ENV_ATTEMPT,
    ENV_ELASTIC_SHUTDOWN,
    ENV_JOB_NAME,
    ENV_JOB_UID,
    ENV_MASTER_ADDR,
    ENV_NODE_RANK,
    ENV_TERMINATION_GRACE,
    ENV_WORKDIR,
    POD_CONFIG_PATH,
    POD_WORKDIR,
    RENDEZVOUS_PORT,
    pod_name,
    trainer_command,
)
from pretrain.operator.elastic import termination_grace_seconds

LABEL_JOB = "pretrain.io/job-name"
LABEL_ATTEMPT = "pretrain.io/attempt"
LABEL_RANK = "pretrain.io/node-rank"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
#: Kueue plain-pod groups: every pod of a gang carries the group's name (label) and size
#: (annotation), so Kueue admits the gang as one workload or not at all.
LABEL_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
#: "false": a failed pod ends its group (the operator replaces the whole gang under a new group
#: name) instead of Kueue holding the quota for a replacement pod that never comes.
ANNOTATION_RETRIABLE_IN_GROUP = "kueue.x-k8s.io/retriable-in-group"
#: Kueue Topology Aware Scheduling: the node label whose one domain holds the podset.
ANNOTATION_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
ANNOTATION_PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"
COMMON_LABELS = {"app.kubernetes.io/name": "pretrain", "app.kubernetes.io/managed-by": "pretrain-operator"}

#: The trainer image's non-root user.
RUN_AS_USER = 1000
#: Every pod the operator makes runs as that user, with no privileges and a read-only root
#: filesystem (what it writes goes to its volumes).
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                                "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                      "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}  # fmt: skip
CONFIG_KEY = "job.json"
#: "standby": a placeholder pod of an elastic job running below maxNodes. It holds a node's
#: worth of resources and tells the operator, by running, that the node is back.
LABEL_ROLE = "pretrain.io/role"
ROLE_STANDBY = "standby"
#: The role of a data preparation worker's pod (the stage's Job controls it, not the PretrainJob).
ROLE_PREPARE = "prepare"


def standby_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-s{rank}"


def pod_group_name(job: str, attempt: int) -> str:
    """One Kueue pod group (or Volcano PodGroup) per attempt: a restarted gang is admitted afresh."""
    return f"{job}-a{attempt}"


#: resources.schedulerName that makes the operator create a Volcano PodGroup per attempt.
VOLCANO = "volcano"
#: The annotation by which Volcano finds a pod's PodGroup.
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"


def service_name(job: str) -> str:
    return job


def configmap_name(job: str) -> str:
    return f"{job}-config"


def master_addr(job: str, namespace: str, attempt: int) -> str:
    """Node 0's stable DNS name: <hostname>.<headless service>.<namespace>.svc."""
    return f"{pod_name(job, attempt, 0)}.{service_name(job)}.{namespace}.svc"


def owner_reference(job: PretrainJob, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid(meta: dict[str, Any], kind: str = KIND) -> str | None:
    """The uid of the PretrainJob (or other `kind`) that controls an object (its controller
    ownerReference), or None: the operator acts on a child only when this is its job's uid."""
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") and ref.get("kind") == kind:
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None


def _meta(job: PretrainJob, name: str, namespace: str, uid: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**COMMON_LABELS, LABEL_JOB: job.metadata.name, **(extra or {})},
        "ownerReferences": [owner_reference(job, uid)],
    }


def trainer_config(job: PretrainJob) -> str:
    """The job as the pods read it: metadata and spec, nothing the operator writes."""
    doc = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc.pop("status", None)
    doc["metadata"] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    doc["metadata"] = {k: v for k, v in doc["metadata"].items() if v is not None}
    import json

    return json.dumps(doc, indent=1, sort_keys=True)


def build_service(job: PretrainJob, namespace: str, uid: str) -> dict[str, Any]:
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(name), namespace, uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous must resolve before pods are ready
            "selector": {LABEL_JOB: name},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
        },
    }


def build_configmap(job: PretrainJob, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, configmap_name(job.metadata.name), namespace, uid),
        "data": {CONFIG_KEY: trainer_config(job)},
    }


def _resources(job: PretrainJob) -> dict[str, Any]:
    r = job.spec.resources
    requests = {k: v for k, v in r.requests.model_dump().items() if v is not None}
    limits = {k: v for k, v in r.limits.model_dump().items() if v is not None}
    if r.accelerator == "gpu":
        requests[r.gpu_resource] = str(r.procs_per_node)
        limits[r.gpu_resource] = str(r.procs_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_meta(
    job: PretrainJob, pod: str, namespace: str, uid: str, attempt: int, rank: int, nodes: int
) -> dict[str, Any]:
    """A trainer pod's metadata: attempt and rank labels, Prometheus annotations, and a Kueue pod
    group (one per attempt) when the job names a queue."""
    r, name = job.spec.resources, job.metadata.name
    labels = {LABEL_ATTEMPT: str(attempt), LABEL_RANK: str(rank), **r.labels}
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(job.spec.monitoring.metrics_port),
        "prometheus.io/path": "/metrics",
        **r.annotations,
    }
    if r.scheduler_name == VOLCANO:
        annotations[ANNOTATION_VOLCANO_GROUP] = pod_group_name(name, attempt)
    elif r.queue_name:
        labels |= {LABEL_QUEUE: r.queue_name, LABEL_POD_GROUP: pod_group_name(name, attempt)}
        annotations |= {ANNOTATION_POD_GROUP_COUNT: str(nodes), ANNOTATION_RETRIABLE_IN_GROUP: "false"}
    if r.topology is not None:  # Kueue TAS: the pod group's one podset, placed within one domain
        key = ANNOTATION_REQUIRED_TOPOLOGY if r.topology.mode == "required" else ANNOTATION_PREFERRED_TOPOLOGY
        annotations[key] = r.topology.level
    meta = _meta(job, pod, namespace, uid, labels)
    meta["annotations"] = annotations
    return meta


def _trainer_env(
    job: PretrainJob, namespace: str, uid: str, attempt: int, rank: int, grace: int
) -> list[dict[str, Any]]:
    """The trainer container's environment: the pod contract (pretrain.contract), then the user's."""
    r, name = job.spec.resources, job.metadata.name
    env: list[dict[str, Any]] = [
        {"name": ENV_NODE_RANK, "value": str(rank)},
        {"name": ENV_MASTER_ADDR, "value": master_addr(name, namespace, attempt)},
        {"name": ENV_JOB_NAME, "value": name},
        # The job's identity for the checkpoint lease: every attempt of this job may take it over.
        {"name": ENV_JOB_UID, "value": uid},
        {"name": ENV_ATTEMPT, "value": str(attempt)},
        # The trainer warns when its checkpoint on SIGTERM came close to the pod's grace period.
        {"name": ENV_TERMINATION_GRACE, "value": str(grace)},
        # torchrun (the container's PID 1, the one process SIGTERM reaches) gives its workers 30 s
        # by default before SIGKILL: they get the pod's grace period instead, less a little for
        # torchrun's own exit.
        {"name": ENV_ELASTIC_SHUTDOWN, "value": str(max(grace - 5, 1))},
        {"name": ENV_WORKDIR, "value": POD_WORKDIR},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_HOME", "value": f"{POD_WORKDIR}/hf"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{POD_WORKDIR}/torch_extensions"},
    ]
    if r.accelerator == "cpu":
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    env += [{"name": e.name, "value": e.value} for e in r.env]
    return env


def build_pod(
    job: PretrainJob, namespace: str, uid: str, attempt: int, rank: int, nodes: int | None = None,
    avoid: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """One node of a gang of `nodes` (default resources.nodes): torchrun, static rendezvous on
    node 0; placed preferably on other nodes than `avoid` (where earlier attempts failed)."""
    r, name = job.spec.resources, job.metadata.name
    nodes = nodes or r.nodes
    grace = termination_grace_seconds(job.spec)
    pod = pod_name(name, attempt, rank)
    pod_spec: dict[str, Any] = {
        "hostname": pod,
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        # Time the trainer gets after SIGTERM to finish its step and save a checkpoint.
        "terminationGracePeriodSeconds": grace,
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [_trainer_container(job, namespace, uid, attempt, rank, nodes, grace)],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(name)}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": r.shm_size}},
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    pod_spec.update(_placement(job))
    if avoid:
        pod_spec["affinity"] = avoiding(pod_spec.get("affinity"), avoid)
    meta = _pod_meta(job, pod, namespace, uid, attempt, rank, nodes)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def _trainer_container(
    job: PretrainJob, namespace: str, uid: str, attempt: int, rank: int, nodes: int, grace: int
) -> dict[str, Any]:
    """torchrun over the trainer, its ports, resources and volumes."""
    spec, r = job.spec, job.spec.resources
    args = trainer_command(
        nnodes=nodes, nproc_per_node=r.procs_per_node, node_rank=f"$({ENV_NODE_RANK})", master_addr=f"$({ENV_MASTER_ADDR})",
        config=POD_CONFIG_PATH, workdir=POD_WORKDIR,
    )  # fmt: skip
    container: dict[str, Any] = {
        "name": "trainer",
        "image": r.image,
        "imagePullPolicy": r.image_pull_policy,
        # A failed trainer's last log lines become the container's termination message, which the
        # operator copies into the job's status and events (nothing writes /dev/termination-log).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": args[:1],
        "args": args[1:],
        "env": _trainer_env(job, namespace, uid, attempt, rank, grace),
        "ports": [
            {"name": "metrics", "containerPort": spec.monitoring.metrics_port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(job),
        # Everything the trainer writes goes to its volumes: /workspace, /tmp, /dev/shm.
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "config", "mountPath": POD_CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": POD_WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.checkpoint.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.checkpoint.credentials_secret}}]
    return container


#: The weight of the preference against failed nodes: the most a preferred term may have.
AVOID_WEIGHT = 100


def avoiding(affinity: dict[str, Any] | None, nodes: tuple[str, ...]) -> dict[str, Any]:
    """`affinity` (the spec's, untouched) plus a preferred node affinity away from `nodes` by
    name (matchFields metadata.name: a node's hostname label need not be its name)."""
    out = copy.deepcopy(affinity or {})
    node_affinity = out.setdefault("nodeAffinity", {})
    preferred = node_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", [])
    preferred.append({"weight": AVOID_WEIGHT, "preference": {
        "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": sorted(nodes)}]}})  # fmt: skip
    return out


def _placement(job: PretrainJob) -> dict[str, Any]:
    """The pod spec's scheduling fields the job sets, passed through as written."""
    r = job.spec.resources
    fields = {"nodeSelector": r.node_selector or None, "tolerations": r.tolerations or None, "affinity": r.affinity,
              "priorityClassName": r.priority_class_name, "schedulerName": r.scheduler_name,
              "serviceAccountName": r.service_account_name}  # fmt: skip
    return {k: v for k, v in fields.items() if v}


def build_standby_pod(job: PretrainJob, namespace: str, uid: str, attempt: int, rank: int) -> dict[str, Any]:
    """A placeholder for node `rank` of an elastic job running below maxNodes: the trainer pod's
    image, resources and placement, running `sleep` instead of torchrun. Once it runs, the node
    is back and the operator grows the gang. It is not part of the gang (no Kueue pod group)."""
    pod = build_pod(job, namespace, uid, attempt, rank)
    name = standby_name(job.metadata.name, attempt, rank)
    meta = pod["metadata"]
    meta["name"] = name
    meta["labels"].pop(LABEL_POD_GROUP, None)  # with Kueue, admitted as a pod of its own
    meta["labels"][LABEL_ROLE] = ROLE_STANDBY
    meta["annotations"] = {k: v for k, v in job.spec.resources.annotations.items()}
    spec = pod["spec"]
    spec["hostname"] = name
    spec["terminationGracePeriodSeconds"] = 0
    container = spec["containers"][0]
    container.update({"name": "standby", "command": ["sleep"], "args": ["infinity"], "env": []})
    for key in ("ports", "envFrom", "terminationMessagePolicy"):
        container.pop(key, None)
    return pod


def build_volcano_pod_group(job: PretrainJob, namespace: str, uid: str, attempt: int, nodes: int) -> dict[str, Any]:
    """The attempt's Volcano PodGroup: Volcano binds none of its pods until all `nodes` fit
    (minMember), in the job's Volcano Queue (resources.queueName) and priority class."""
    r = job.spec.resources
    spec: dict[str, Any] = {"minMember": nodes}
    if r.queue_name:
        spec["queue"] = r.queue_name
    if r.priority_class_name:
        spec["priorityClassName"] = r.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": _meta(job, pod_group_name(job.metadata.name, attempt), namespace, uid),
        "spec": spec,
    }


def build_pod_monitor(job: PretrainJob, namespace: str, uid: str) -> dict[str, Any]:
    """A Prometheus Operator PodMonitor for the job's pods (when monitoring.podMonitor is set)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(job, job.metadata.name, namespace, uid),
        "spec": {
            "selector": {"matchLabels": {LABEL_JOB: job.metadata.name}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    }
