"""A job's progress: node 0's Prometheus endpoint scraped and read into `status.progress`, the
last checkpoint and the evaluation; a scrape that fails changes nothing (it never fails a job)."""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pretrain.api.spec import Phase, PretrainJob
from pretrain.metrics import names
from pretrain.operator.cluster import Cluster
from pretrain.operator.planner import Observed
from pretrain.operator.reconcile import job_from, observe_for, plain
from pretrain.storage.manifest import step_name
from pretrain.timestamps import rfc3339

log = logging.getLogger("pretrain.operator")


def parse_metrics(text: str) -> dict[str, float]:
    """Sample values by sample name (labels dropped: the endpoint is one rank's), with
    prometheus_client's parser; task metrics keep their label (`pretrain_eval_metric:accuracy`).
    An exposition the parser refuses gives no samples (the scrape is skipped, as a failed one)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name
                if name == names.EVAL_METRIC:
                    name = f"{name}:{sample.labels.get(names.EVAL_METRIC_LABEL, '')}"
                elif name == names.SOURCE_TOKENS:
                    name = f"{name}:{sample.labels.get(names.SOURCE_LABEL, '')}"
                elif name == names.TIME_SECONDS:
                    name = f"{name}:{sample.labels.get(names.TIME_KIND, '')}"
                elif name == names.GUARD_EVENTS:
                    name = f"{name}:{sample.labels.get(names.GUARD_KIND, '')}"
                elif name == names.STORAGE_RETRYING_INFO:
                    name = f"{name}:{json.dumps([sample.labels.get(k, '') for k in names.STORAGE_RETRYING_LABELS])}"
                out[name] = float(sample.value)
    except ValueError:
        return {}
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse_metrics(resp.read().decode("utf-8", "replace"))


def evaluation_from(samples: dict[str, float]) -> dict[str, float]:
    """status.evaluation: the task metrics of the latest evaluation."""
    prefix = f"{names.EVAL_METRIC}:"
    return {k[len(prefix) :]: round(v, 4) for k, v in samples.items() if k.startswith(prefix) and k != prefix}


def storage_retrying_from(samples: dict[str, float]) -> dict[str, Any] | None:
    """status.progress.storageRetrying: the storage call node 0 has been retrying, or None."""
    since = samples.get(names.STORAGE_RETRYING_SINCE)
    prefix = f"{names.STORAGE_RETRYING_INFO}:"
    labels = next((json.loads(k[len(prefix) :]) for k in samples if k.startswith(prefix)), None)
    if not since or labels is None:
        return None
    operation, error = labels
    return {"since": rfc3339(datetime.fromtimestamp(since, UTC)), "operation": operation, "error": error}


def progress_from(samples: dict[str, float], now: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(status.progress, status.lastCheckpoint or None) from scraped samples."""
    step = samples.get(names.STEP)
    total = samples.get(names.TOTAL_STEPS)
    tps = samples.get(names.TOKENS_PER_SECOND)
    loss = samples.get(names.TRAIN_LOSS)
    progress: dict[str, Any] = {"updatedTime": rfc3339(now)}
    if step is not None:
        progress["step"] = int(step)
    if total:
        progress["totalSteps"] = int(total)
        if step is not None:
            progress["percent"] = round(100.0 * step / total, 1)
    if loss is not None and math.isfinite(loss):
        progress["loss"] = round(loss, 4)
    if tps is not None:
        progress["tokensPerSecond"] = round(tps, 1)
    mfu = samples.get(names.MFU)
    if mfu is not None and 0 < mfu <= 1:  # 0: the device's peak is unknown (a CPU), no MFU
        progress["mfu"] = round(mfu, 4)
    seconds = samples.get(f"{names.STEP_DURATION}_sum")
    count = samples.get(f"{names.STEP_DURATION}_count")
    if seconds and count and total and step is not None:
        progress["etaSeconds"] = round(seconds / count * (total - step), 0)
    prefix = f"{names.SOURCE_TOKENS}:"
    by_source = {k[len(prefix) :]: int(v) for k, v in samples.items() if k.startswith(prefix) and k != prefix}
    if by_source:
        progress["sourceTokens"] = by_source
    beat, limit = samples.get(names.HEARTBEAT), samples.get(names.STALL_LIMIT)
    if beat and limit:
        progress["heartbeat"] = {"time": rfc3339(datetime.fromtimestamp(beat, UTC)), "limitSeconds": round(limit)}
    prefix = f"{names.TIME_SECONDS}:"
    spent = {k[len(prefix) :]: round(v, 3) for k, v in samples.items() if k.startswith(prefix) and k != prefix}
    if spent:
        progress["time"] = spent | ({"stepSeconds": round(seconds / count, 4)} if seconds and count else {})
    prefix = f"{names.GUARD_EVENTS}:"
    guard_events = sum(int(v) for k, v in samples.items() if k.startswith(prefix))
    if guard_events:
        progress["guard"] = {"events": guard_events, "lastStep": int(samples.get(names.GUARD_LAST_STEP) or 0)}
    retrying = storage_retrying_from(samples)
    if retrying is not None:
        progress["storageRetrying"] = retrying
    ckpt = None
    ck_step = samples.get(names.CHECKPOINT_STEP)
    ck_time = samples.get(names.CHECKPOINT_TIME)
    if ck_step is not None and ck_time:
        ckpt = {"step": int(ck_step), "time": rfc3339(datetime.fromtimestamp(ck_time, UTC))}
    return progress, ckpt


@dataclass(frozen=True)
class ProgressTarget:
    """Where a running job's progress is read, and the status it would update."""

    url: str
    checkpoint_uri: str | None
    status: dict[str, Any]


def progress_target(job: PretrainJob | None, status: Mapping[str, Any], observed: Observed) -> ProgressTarget | None:
    if job is None or status.get("phase") not in (Phase.RUNNING.value, Phase.PENDING.value):
        return None
    node0 = [p for p in observed.pods
             if p.attempt == status.get("attempt") and p.rank == 0 and p.phase == "Running" and p.ip and not p.deleting]  # fmt: skip
    if not node0:
        return None
    url = f"http://{node0[0].ip}:{job.spec.monitoring.metrics_port}/metrics"
    return ProgressTarget(url, job.spec.checkpoint.uri, dict(status))


def progress_patch(target: ProgressTarget, now: datetime) -> dict[str, Any] | None:
    """The status patch of one scrape of node 0 (step, loss, tokens/s, ETA, last checkpoint, task
    metrics), or None when the scrape failed (the old values stay: a scrape never fails a job)."""
    try:
        samples = scrape(target.url)
    except OSError as e:
        log.debug("progress scrape of %s failed: %s", target.url, e)
        return None
    prog, ckpt = progress_from(samples, now)
    for key in (
        "storageRetrying",
        "heartbeat",
        "guard",
        "time",
    ):  # whose: a stale record of an earlier attempt means nothing
        if key in prog:
            prog[key]["attempt"] = target.status.get("attempt")
    old = target.status.get("progress") or {}
    if names.STEP not in samples:  # still setting up: only the storage's state is news
        if "storageRetrying" in prog or old.get("storageRetrying"):
            return {"progress": {"storageRetrying": prog.get("storageRetrying"), "updatedTime": prog["updatedTime"]}}
        return None
    # A merge patch merges into the old progress: fields this scrape lacks are cleared explicitly.
    patch: dict[str, Any] = {"progress": {**{k: None for k in old if k not in prog}, **prog}}
    evaluation = evaluation_from(samples)
    if evaluation:
        patch["evaluation"] = evaluation
    if ckpt is not None:
        if target.checkpoint_uri:
            ckpt["uri"] = f"{target.checkpoint_uri.rstrip('/')}/{step_name(ckpt['step'])}"
        patch["lastCheckpoint"] = ckpt
    return patch


def progress_job(
    namespace: str, name: str, cluster: Cluster, now: datetime, target: ProgressTarget | None = None
) -> bool:
    """Scrape node 0 and write the progress into the status (merge patch, no precondition: it
    only touches the fields it owns). Without a cached target, the job and its pods are read."""
    if target is None:
        body = cluster.read_job(namespace, name)
        if body is None:
            return False
        job, _invalid = job_from(body)
        target = progress_target(job, plain(body.get("status")) or {}, observe_for(cluster, body, job))
    if target is None:
        return False
    patch = progress_patch(target, now)
    if patch is None:
        return False
    cluster.write_status(namespace, name, patch, None)
    return True
