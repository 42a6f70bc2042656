"""The operator's own Prometheus metrics: jobs by phase, restarts, reconcile duration and errors, leadership."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
JOBS = Gauge("pretrain_operator_jobs", "PretrainJobs by phase.", ["phase"], registry=REGISTRY)
RESTARTS = Counter("pretrain_operator_restarts_total", "Gang restarts started.", ["namespace"], registry=REGISTRY)
RECONCILE = Histogram(
    "pretrain_operator_reconcile_duration_seconds", "Time of one reconcile of one job.", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
ERRORS = Counter(
    "pretrain_operator_reconcile_errors_total", "Reconciles that raised.", ["namespace"], registry=REGISTRY
)

LEADER = Gauge(
    "pretrain_operator_leader", "1 while this replica holds the leader lease (or runs without election).",
    registry=REGISTRY,
)  # fmt: skip

_phases: dict[tuple[str, str], str] = {}


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Track one job's phase; the gauge counts jobs per phase across all jobs seen."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    counts: dict[str, int] = {}
    for p in _phases.values():
        counts[p] = counts.get(p, 0) + 1
    for p in ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"):
        JOBS.labels(p).set(counts.get(p, 0))
