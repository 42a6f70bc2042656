"""The data preparation stage (spec.data.prepare): before the first gang, an Indexed Job that the
PretrainJob owns runs `workers` pods of `pretrain data prepare --index k --count n`, each writing
its share of the units of work into data.cacheUri; the last worker to finish commits the dataset
(its manifest, last). The trainer's pods then read the dataset from there, verified.

The Job is Kubernetes' own engine for this: a failed worker is retried alone (its index, up to
`backoffLimitPerIndex`), and the parts already written stay. The operator reads the Job's status
for the job's (`status.preparation`: workers done, failed indexes); a Job that completes lets the
first attempt start, and is deleted (with its pods, propagationPolicy Background); a failed one
fails the job with reason PreparationFailed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pretrain.api.spec import PretrainJob
from pretrain.contract import POD_CONFIG_PATH, prepare_command
from pretrain.operator.children import (
    CONTAINER_SECURITY,
    LABEL_ROLE,
    POD_SECURITY,
    ROLE_PREPARE,
    _meta,
    configmap_name,
    controller_uid,
)

PREPARATION_FAILED = "PreparationFailed"


def prepare_job_name(job: str) -> str:
    return f"{job}-prepare"


def preparation_key(job: PretrainJob) -> str:
    """What names a prepared dataset as far as the operator can tell without reading the inputs
    (their listing and the tokenizer's fingerprint are the trainer's): the cache, the sources,
    the packing and the tokenizer's spec. A later job with the same key reuses the dataset of
    the job that prepared it (no preparation stage); had the inputs changed since, its rank 0
    prepares the new dataset itself."""
    import hashlib
    import json

    d = job.spec.data
    key = {"cacheUri": d.cache_uri, "sequenceLength": d.sequence_length, "validationSplit": d.validation_split,
           "sources": [s.model_dump(exclude={"weight"}) for s in d.sources],
           "validationSources": [s.model_dump(exclude={"weight"}) for s in d.validation_sources],
           "tokenizer": job.spec.tokenizer.model_dump(), "vocabSize": job.spec.model.vocab_size}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrepareView:
    """What the planner reads of the stage's Job."""

    owner: str | None  # the controlling PretrainJob's uid
    uid: str | None  # the Job's own: its pods' controller
    completed: int
    failed_indexes: str
    complete: bool
    failed: bool
    message: str = ""
    deleting: bool = False


def prepare_view(obj: dict[str, Any]) -> PrepareView:
    status = obj.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = true.get("Failed") or {}
    return PrepareView(
        owner=controller_uid(obj["metadata"]),
        uid=obj["metadata"].get("uid"),
        completed=int(status.get("succeeded") or 0),
        failed_indexes=str(status.get("failedIndexes") or ""),
        complete="Complete" in true,
        failed="Failed" in true,
        message=str(failed.get("message") or ""),
        deleting=bool(obj["metadata"].get("deletionTimestamp")),
    )


def build_prepare_job(job: PretrainJob, namespace: str, uid: str) -> dict[str, Any]:
    """The stage's Indexed Job: CPU pods of the trainer image, reading the job's ConfigMap."""
    spec, prep = job.spec, job.spec.data.prepare
    assert prep is not None
    name = prepare_job_name(job.metadata.name)
    resources = {k: {n: v for n, v in getattr(prep, k).model_dump().items() if v is not None}
                 for k in ("requests", "limits")}  # fmt: skip
    container: dict[str, Any] = {
        "name": "prepare",
        "image": spec.resources.image,
        "imagePullPolicy": spec.resources.image_pull_policy,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": prepare_command(index="$(JOB_COMPLETION_INDEX)", count=prep.workers),
        "env": [{"name": "HOME", "value": "/tmp"}, *({"name": e.name, "value": e.value} for e in spec.resources.env)],
        "resources": {k: v for k, v in resources.items() if v},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "config", "mountPath": POD_CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.checkpoint.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.checkpoint.credentials_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(job.metadata.name)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.resources.service_account_name:  # the identity that reads the corpus and writes the cache
        pod_spec["serviceAccountName"] = spec.resources.service_account_name
    meta = _meta(job, name, namespace, uid)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "completionMode": "Indexed", "completions": prep.workers, "parallelism": prep.parallelism or prep.workers,
        "backoffLimitPerIndex": prep.backoff_limit_per_index,
        "template": {"metadata": {"labels": {**meta["labels"], LABEL_ROLE: ROLE_PREPARE}}, "spec": pod_spec}}}  # fmt: skip
