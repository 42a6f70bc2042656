"""batch/v1 Job admission, as the API server defaults and validates a Job where the operator and
the stand-in Job controller (tests/jobcontroller.py) rely on it.

Defaults: parallelism 1; completions 1 when neither it nor parallelism is given; completionMode
NonIndexed; backoffLimit 6 (the int32 maximum with backoffLimitPerIndex); suspend false; the
generated selector on `batch.kubernetes.io/controller-uid` and the labels the controller's pods
carry. Refused, in the API server's words: a pod template whose restartPolicy is not Never or
OnFailure, an Indexed Job without completions, backoffLimitPerIndex on a NonIndexed Job, a name
over 63 characters (it becomes a label value), and changes to the template, the completion mode
or the selector. Deleting a Job through the API orphans its pods unless a propagationPolicy says
otherwise (batch/v1's legacy default; kubectl asks for Background).
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"
TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
INDEX_FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
INT32_MAX = 2**31 - 1


def default_job(job: Obj) -> None:
    """The API server's defaults, in place (on create; `metadata.uid` is already set)."""
    meta, spec = job["metadata"], job.setdefault("spec", {})
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("backoffLimit", INT32_MAX if spec.get("backoffLimitPerIndex") is not None else 6)
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {CONTROLLER_UID: meta["uid"]}}
        labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
        labels.update({CONTROLLER_UID: meta["uid"], JOB_NAME: meta["name"], "controller-uid": meta["uid"],
                       "job-name": meta["name"]})  # fmt: skip


def job_errors(job: Obj, old: Obj | None) -> list[str]:
    spec = job.get("spec") or {}
    errs = []
    if len(job["metadata"]["name"]) > 63:
        errs.append(f"metadata.name: Invalid value: {job['metadata']['name']!r}: must be no more than 63 characters")
    policy = ((spec.get("template") or {}).get("spec") or {}).get("restartPolicy", "Always")
    if policy not in ("Never", "OnFailure"):
        errs.append(f'spec.template.spec.restartPolicy: Unsupported value: "{policy}": supported values: '
                    '"OnFailure", "Never"')  # fmt: skip
    indexed = spec.get("completionMode") == "Indexed"
    if indexed and spec.get("completions") is None:
        errs.append("spec.completions: Required value: when completion mode is Indexed")
    if spec.get("backoffLimitPerIndex") is not None and not indexed:
        errs.append("spec.backoffLimitPerIndex: Forbidden: requires indexed completion mode")
    if old is not None:
        for key in ("template", "completionMode", "selector"):
            if spec.get(key) != (old.get("spec") or {}).get(key):
                errs.append(f"spec.{key}: Invalid value: ...: field is immutable")
    return errs
