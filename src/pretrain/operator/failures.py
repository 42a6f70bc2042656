"""What a pod failure means for the job: the failure policy, as a pure function.

A gang fails as one: when one pod stops, its peers' torchrun agents lose the rendezvous and fail
moments later with exit codes of their own. So, like JobSet, the policy looks at the pod that
failed *first* (by the time its container terminated, or its disruption condition appeared) and
lets the spec's rules decide, in order; the first that matches wins. Then the defaults:

- a disruption (eviction, preemption, node loss or drain: `DISRUPTION_REASONS`) restarts the
  gang without counting against maxRestarts: nothing was wrong with the job;
- anything else restarts and counts: an exit code of the trainer, an OOMKilled container (the
  message says so, with what to change), or a pod that vanished without a trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pretrain.api.spec import DISRUPTION_REASONS, FailureAction, FailurePolicyRule, FailurePolicySpec
from pretrain.contract import STALLED

#: The container's terminated reason when the kernel's OOM killer ended it.
OOM_KILLED = "OOMKilled"
#: The reason of a pod deleted while it ran by someone else, with no disruption condition.
POD_DELETED = "PodDeleted"


@dataclass(frozen=True)
class FailedPod:
    """What the policy reads of a failed pod (a subset of the planner's PodView)."""

    name: str
    exit_code: int | None
    reasons: tuple[str, ...]
    message: str = ""
    finished: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    """The action for a gang failure and the words for the job's status."""

    action: FailureAction
    why: str  # "pod x failed (exit code 1): ...", "pod x was OOMKilled ..."
    reason: str  # a CamelCase word for the condition: PodFailed, OOMKilled, Disruption, PodMissing
    rule: str | None = None  # "failurePolicy rule 2 (name)" when a spec rule decided

    @property
    def counts(self) -> bool:
        return self.action == "RestartJob"


def first_failed(pods: list[FailedPod]) -> FailedPod:
    """The pod whose failure came first; pods with no known time count as failing now (last)."""
    return min(pods, key=lambda p: (p.finished is None, p.finished or datetime.max, p.name))


def _matches(rule: FailurePolicyRule, pod: FailedPod) -> bool:
    if rule.on_exit_codes is not None:
        if pod.exit_code is None:
            return False
        inside = pod.exit_code in rule.on_exit_codes.values
        if inside != (rule.on_exit_codes.operator == "In"):
            return False
    return rule.on_reasons is None or bool(set(rule.on_reasons) & set(pod.reasons))


def describe(pod: FailedPod) -> tuple[str, str]:
    """(why, reason) of a failed pod, in the words of the status message and condition."""
    code = f"exit code {pod.exit_code}" if pod.exit_code is not None else "no exit code"
    tail = f": {pod.message}" if pod.message else ""
    if OOM_KILLED in pod.reasons:
        return (
            f"pod {pod.name} was OOMKilled ({code}): raise resources.limits.memory or lower training.microBatchSize",
            "OOMKilled",
        )
    disruption = [r for r in pod.reasons if r in DISRUPTION_REASONS]
    if disruption:
        return f"pod {pod.name} was disrupted ({', '.join(disruption)}){tail}", "Disruption"
    if STALLED in pod.reasons:
        return f"pod {pod.name} stalled{tail}", STALLED
    if POD_DELETED in pod.reasons:
        return f"pod {pod.name} was deleted while it ran (kubectl delete pod, or another client)", POD_DELETED
    signal = _signal_name(pod.exit_code)
    if signal:  # killed: its last log line is not why, only where it was
        last = f"; its last log line: {pod.message}" if pod.message else ""
        return f"pod {pod.name} was killed by {signal} ({code}){last}", "PodFailed"
    return f"pod {pod.name} failed ({code}){tail}", "PodFailed"


def _signal_name(exit_code: int | None) -> str | None:
    """SIGKILL for 137, SIGTERM for 143...: a container's exit code 128+N is death by signal N."""
    import signal

    if exit_code is None or not 128 < exit_code < 128 + 65:
        return None
    try:
        return signal.Signals(exit_code - 128).name
    except ValueError:
        return None


def decide_start_failure(policy: FailurePolicySpec, pod: FailedPod) -> Verdict | None:
    """The verdict of a spec rule for a pod whose container cannot start (its waiting reason in
    `pod.reasons`: ErrImagePull, CreateContainerConfigError, ...), or None when no rule names it.
    With no rule the job waits: the kubelet retries pulls, and a missing Secret may be created."""
    why = f"pod {pod.name} cannot start ({', '.join(pod.reasons)})" + (f": {pod.message}" if pod.message else "")
    for i, rule in enumerate(policy.rules, start=1):
        if rule.on_exit_codes is None and _matches(rule, pod):
            label = f"failurePolicy rule {i}" + (f" ({rule.name})" if rule.name else "")
            return Verdict(rule.action, why, pod.reasons[0], label)
    return None


def decide(policy: FailurePolicySpec, pod: FailedPod | None, missing: str | None = None) -> Verdict:
    """The verdict for the gang's first failed pod, or for a pod that vanished (`missing`)."""
    if pod is None:
        why, reason = f"pod {missing} disappeared", "PodMissing"
        pod = FailedPod(name=missing or "?", exit_code=None, reasons=("PodMissing",))
    else:
        why, reason = describe(pod)
    for i, rule in enumerate(policy.rules, start=1):
        if _matches(rule, pod):
            label = f"failurePolicy rule {i}" + (f" ({rule.name})" if rule.name else "")
            return Verdict(rule.action, why, reason, label)
    if reason in ("Disruption", POD_DELETED):  # nothing was wrong with the job
        return Verdict("RestartJobIgnore", why, reason)
    return Verdict("RestartJob", why, reason)
