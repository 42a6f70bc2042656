"""Reading a job's progress from node 0's Prometheus endpoint, for `status.progress`."""

from __future__ import annotations

import math
import urllib.request
from datetime import datetime
from typing import Any

from pretrain.operator.planner import iso


def parse_metrics(text: str) -> dict[str, float]:
    """Sample values by metric name (labels dropped; the endpoint is one rank's)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, rest = line.rpartition("} ") if "{" in line else line.partition(" ")
        name = name_labels.split("{", 1)[0]
        if name == "pretrain_eval_metric":  # keep the metric label: one sample per task metric
            label = name_labels.split('metric="', 1)[1].split('"', 1)[0] if 'metric="' in name_labels else ""
            name = f"{name}:{label}"
        try:
            out[name] = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse_metrics(resp.read().decode("utf-8", "replace"))


def evaluation_from(samples: dict[str, float]) -> dict[str, float]:
    """status.evaluation: the task metrics of the latest evaluation."""
    prefix = "pretrain_eval_metric:"
    return {k[len(prefix) :]: round(v, 4) for k, v in samples.items() if k.startswith(prefix) and k != prefix}


def progress_from(samples: dict[str, float], now: datetime) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(status.progress, status.lastCheckpoint or None) from scraped samples."""
    step = samples.get("pretrain_step")
    total = samples.get("pretrain_total_steps")
    tps = samples.get("pretrain_tokens_per_second")
    loss = samples.get("pretrain_train_loss")
    progress: dict[str, Any] = {"updatedTime": iso(now)}
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
    seconds = samples.get("pretrain_step_duration_seconds_sum")
    count = samples.get("pretrain_step_duration_seconds_count")
    if seconds and count and total and step is not None:
        progress["etaSeconds"] = round(seconds / count * (total - step), 0)
    ckpt = None
    ck_step = samples.get("pretrain_checkpoint_last_verified_step")
    ck_time = samples.get("pretrain_checkpoint_last_verified_timestamp_seconds")
    if ck_step is not None and ck_time:
        ckpt = {"step": int(ck_step), "time": iso(datetime.utcfromtimestamp(ck_time))}
    return progress, ckpt
