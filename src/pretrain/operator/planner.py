"""The operator's brain: a pure function from (job, observed children, time) to a plan.

It decides; it never talks to the API. Every decision is derived from what is observed (pod
labels, phases, exit codes) and from the job's own status, so a restarted operator re-derives the
same plan and never duplicates or loses anything. The phase machine:

    Pending --all pods running--> Running --all pods succeeded--> Succeeded
       |  \\                          |
       |   any pod failed or gone ----+--> Restarting --backoff--> Pending (attempt + 1)
       |                               \\-> Failed (restarts exhausted, deadline)
    Suspended <--spec.runPolicy.suspend--> (pods deleted; attempt + 1 on resume)
    Invalid spec --> Failed with condition Invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pretrain.api.spec import DISRUPTION_REASONS, INT32_MAX, Phase, PretrainJob
from pretrain.api.validation import spec_warnings
from pretrain.contract import STALLED, is_stalled, parse_done, parse_prepared, pod_name
from pretrain.operator import goodput
from pretrain.operator.children import (
    CONFIG_KEY,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_RANK,
    LABEL_ROLE,
    ROLE_PREPARE,
    ROLE_STANDBY,
    VOLCANO,
    build_configmap,
    build_pod,
    build_pod_monitor,
    build_service,
    build_standby_pod,
    build_volcano_pod_group,
    controller_uid,
    pod_group_name,
)
from pretrain.operator.elastic import fit, size_range
from pretrain.operator.failures import POD_DELETED, FailedPod, Verdict, decide, decide_start_failure, first_failed
from pretrain.operator.nodes import NODE_NOT_READY, NodeFault, NodeView, hit_by, node_fault
from pretrain.operator.preparation import (
    PREPARATION_FAILED,
    PrepareView,
    build_prepare_job,
    preparation_key,
    prepare_job_name,
)
from pretrain.storage.manifest import step_name
from pretrain.timestamps import parse_time, rfc3339

TERMINAL = {Phase.SUCCEEDED.value, Phase.FAILED.value}
#: Pod conditions that mark a pod being taken away (eviction, preemption, node drain, Kueue).
DISRUPTION_CONDITIONS = ("DisruptionTarget", "TerminationTarget")


@dataclass(frozen=True)
class PodView:
    """What the planner needs to know of a pod."""

    name: str
    attempt: int
    rank: int
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    created: datetime | None = None
    exit_code: int | None = None
    message: str = ""
    deleting: bool = False
    ip: str | None = None
    #: Why it stopped, in every form the failure policy matches: the pod's status reason, True
    #: disruption conditions (type and reason), the container's terminated reason.
    reasons: tuple[str, ...] = ()
    finished: datetime | None = None  # when the container terminated, or the disruption began
    #: Bound to a node (spec.nodeName, or PodScheduled True): a Pending pod that is not cannot
    #: be placed yet.
    scheduled: bool = False
    #: A placeholder of an elastic job below maxNodes (children.build_standby_pod), not a trainer.
    standby: bool = False
    #: The uid of the PretrainJob controlling it (None: no controller reference of ours).
    owner: str | None = None
    #: (reason, message) of a container the kubelet cannot start (ErrImagePull, a missing
    #: Secret, an init container in CrashLoopBackOff...), or None.
    waiting: tuple[str, str] | None = None
    #: The scheduler's words on a pod it cannot place ("0/4 nodes are available: ...").
    unschedulable: str = ""
    #: The node it was bound to (spec.nodeName), if any.
    node: str | None = None
    #: Its pretrain.io/role label: "" for a trainer, ROLE_STANDBY, ROLE_PREPARE.
    role: str = ""
    #: A preparation worker's controlling (batch) Job's uid.
    job_controller: str | None = None

    def failed(self, *, deleted: bool = False) -> FailedPod:
        """What the failure policy reads; a pod deleted while it ran (by someone other than the
        operator, with no disruption condition: `kubectl delete pod`) gets reason PodDeleted."""
        reasons = self.reasons
        if deleted and self.exit_code is None and not set(reasons) & set(DISRUPTION_REASONS):
            reasons = (*reasons, POD_DELETED)
        if is_stalled(self.message):  # its watchdog fired: a failurePolicy rule may name Stalled
            reasons = (*reasons, STALLED)
        return FailedPod(self.name, self.exit_code, reasons, self.message, self.finished)


@dataclass(frozen=True)
class Observed:
    pods: list[PodView] = field(default_factory=list)
    service: bool = False
    configmap: bool = False
    pod_monitor: bool = False
    config: str | None = None  # the job.json the ConfigMap holds now
    #: Controller uids of the Service and ConfigMap of the job's name (None: not ours, or absent).
    service_owner: str | None = None
    configmap_owner: str | None = None
    #: The data preparation stage's Job (data.prepare), whoever controls it.
    prepare_job: PrepareView | None = None
    #: The pods of that Job (its controller's, read for their summaries only).
    prepare_workers: list[PodView] = field(default_factory=list)
    #: Preparation key -> a job of the namespace whose stage prepared that data (read once, for
    #: a new job with data.prepare).
    prepared_elsewhere: dict[str, str] = field(default_factory=dict)
    #: The nodes the job's pods are bound to, as the node cache knows them (absent: unknown, or
    #: the operator may not read Nodes).
    nodes: dict[str, NodeView] = field(default_factory=dict)


def own_children(observed: Observed, uid: str) -> tuple[Observed, list[str]]:
    """The children `uid` controls, and what of the job's names belongs to another controller:
    an earlier job of the same name whose pods are still terminating (its Service and ConfigMap
    await the garbage collector), or objects someone else made with the job's label. Those are
    never counted, adopted or deleted; a fresh attempt waits for them, since its pods, Service
    and ConfigMap take the same names."""
    pods = [p for p in observed.pods if p.owner == uid]
    others = [f"pod {p.name}" for p in observed.pods if p.owner != uid and p.owner is not None]
    if observed.service and observed.service_owner != uid:
        others.append("its Service")
    if observed.configmap and observed.configmap_owner != uid:
        others.append("its ConfigMap")
    prep = observed.prepare_job
    if prep is not None and prep.owner != uid:
        others.append("its preparation Job")
    prep_uid = prep.uid if prep is not None and prep.owner == uid and prep.uid else "-"  # "-": no uid is
    own = Observed(
        pods=pods,
        service=observed.service and observed.service_owner == uid,
        configmap=observed.configmap and observed.configmap_owner == uid,
        pod_monitor=observed.pod_monitor,
        config=observed.config if observed.configmap_owner == uid else None,
        service_owner=uid if observed.service_owner == uid else None,
        configmap_owner=uid if observed.configmap_owner == uid else None,
        prepare_job=prep if prep is not None and prep.owner == uid else None,
        prepare_workers=[p for p in observed.pods if p.role == ROLE_PREPARE and p.job_controller == prep_uid],
        prepared_elsewhere=observed.prepared_elsewhere,
        nodes={n: v for n, v in observed.nodes.items() if any(p.node == n for p in pods)},
    )
    return own, others


STORAGE_UNAVAILABLE = "StorageUnavailable"


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    replace: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    #: Pods deleted with a zero grace period: on a NotReady node no kubelet confirms a graceful
    #: deletion, so it would hang in Terminating and hold the next attempt back for good. Safe:
    #: a trainer still running there loses the checkpoint lease to the next attempt (storage/lease.py).
    force_delete: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # the whole new status
    events: list[Event] = field(default_factory=list)
    #: Seconds until something timed is due (backoff, scheduling timeout, deadline, TTL): the
    #: controller reconciles again then, whatever the events.
    requeue_after: float | None = None
    #: Set the job's spec.runPolicy.suspend (schedulingTimeoutAction Suspend): the one spec write.
    suspend_job: bool = False
    #: Delete the job itself (ttlSecondsAfterFinished), its uid as the precondition.
    delete_job: bool = False

    def due_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    @property
    def empty(self) -> bool:
        return not (self.create or self.replace or self.delete or self.force_delete or self.events or self.delete_job)


def _message_line(message: str) -> str:
    """The line of a container's termination message that says why: the last (a reason, or the
    last log line under FallbackToLogsOnError), or the first of a stalled trainer's (its stacks follow)."""
    lines = message.strip().splitlines()
    if not lines:
        return ""
    return lines[0] if is_stalled(lines[0]) else lines[-1]


def pod_view(obj: dict[str, Any]) -> PodView:
    """A PodView from a Pod as the API returns it (camelCase dict)."""
    meta = obj.get("metadata", {})
    labels = meta.get("labels", {}) or {}
    status = obj.get("status", {}) or {}
    exit_code, message = None, status.get("message", "") or ""
    reasons: list[str] = [status["reason"]] if status.get("reason") else []
    finished: datetime | None = None
    for cs in status.get("containerStatuses", []) or []:
        term = (cs.get("state", {}) or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            message = term.get("message") or term.get("reason") or message
            reasons += [term["reason"]] if term.get("reason") else []
            finished = parse_time(term.get("finishedAt")) or finished
    for cond in status.get("conditions", []) or []:
        if cond.get("status") == "True" and cond.get("type") in DISRUPTION_CONDITIONS:
            reasons += [cond["type"]] + ([cond["reason"]] if cond.get("reason") else [])
            finished = min(filter(None, (finished, parse_time(cond.get("lastTransitionTime")))), default=None)
    if status.get("phase") == "Unknown":
        reasons.append("NodeLost")  # the node stopped reporting: the pod's state is lost with it
    created = meta.get("creationTimestamp")
    scheduled = bool((obj.get("spec") or {}).get("nodeName")) or any(
        c.get("type") == "PodScheduled" and c.get("status") == "True" for c in status.get("conditions", []) or []
    )
    return PodView(
        name=meta["name"],
        attempt=int(labels.get(LABEL_ATTEMPT, "0")),
        rank=int(labels.get(LABEL_RANK, "0")),
        phase=status.get("phase", "Pending"),
        created=parse_time(created),
        exit_code=exit_code,
        message=_message_line(str(message)),
        deleting=bool(meta.get("deletionTimestamp")),
        ip=status.get("podIP"),
        reasons=tuple(dict.fromkeys(reasons)),
        finished=finished,
        scheduled=scheduled,
        standby=labels.get(LABEL_ROLE) == ROLE_STANDBY,
        role=str(labels.get(LABEL_ROLE) or ""),
        job_controller=controller_uid(meta, "Job") if labels.get(LABEL_ROLE) == ROLE_PREPARE else None,
        owner=controller_uid(meta),
        waiting=_start_failure(status),
        unschedulable=_scheduler_message(status),
        node=(obj.get("spec") or {}).get("nodeName") or None,
    )


#: Waiting reasons of a container that is on its way (not a failure to start).
STARTING_REASONS = ("ContainerCreating", "PodInitializing")


def _scheduler_message(status: dict[str, Any]) -> str:
    for c in status.get("conditions", []) or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return str(c.get("message") or "")
    return ""


def _start_failure(status: dict[str, Any]) -> tuple[str, str] | None:
    """The first container (init containers first) waiting for a reason other than starting up."""
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in STARTING_REASONS:
            message = str(waiting.get("message") or "").strip()
            return str(reason), message.splitlines()[-1][:512] if message else ""
    return None


def final_status(done: dict[str, Any] | None, checkpoint_uri: str | None) -> dict[str, Any]:
    """status.progress and status.lastCheckpoint from rank 0's summary in its termination message:
    the last scrape came before the last steps, and no metrics endpoint outlives the pods."""
    if not done:
        return {}

    def count(key: str) -> int | None:
        v = done.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT32_MAX else None

    out: dict[str, Any] = {}
    step, total = count("step"), count("totalSteps")
    if step is not None:
        progress: dict[str, Any] = {"step": step, "etaSeconds": 0}
        if total:
            progress |= {"totalSteps": total, "percent": round(100.0 * min(step, total) / total, 1)}
        loss = done.get("trainLoss")
        if isinstance(loss, float | int) and not isinstance(loss, bool) and math.isfinite(loss):
            progress["loss"] = round(float(loss), 4)
        out["progress"] = progress
    saved = count("checkpointStep")
    if saved is not None:
        ckpt: dict[str, Any] = {"step": saved}
        when = done.get("checkpointTime")
        if isinstance(when, str) and parse_time(when) is not None:
            ckpt["time"] = when
        if checkpoint_uri:
            ckpt["uri"] = f"{checkpoint_uri.rstrip('/')}/{step_name(saved)}"
        out["lastCheckpoint"] = ckpt
    return out


def backoff_seconds(job: PretrainJob, restarts: int) -> int:
    rp = job.spec.run_policy
    return int(min(rp.restart_backoff_seconds * 2 ** max(restarts - 1, 0), rp.max_restart_backoff_seconds))


class _Status:
    """The status being planned, with Kubernetes-style condition bookkeeping."""

    def __init__(self, old: dict[str, Any], now: datetime, generation: int | None) -> None:
        import copy

        self.s = copy.deepcopy(old)
        self.now = now
        self.s["observedGeneration"] = generation
        self.generation = generation
        self.events: list[Event] = []
        self.due: list[float] = []  # seconds until a timed check

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        set_condition(self.s.setdefault("conditions", []), type_, status, reason, message, self.now, self.generation)

    def get_condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.s.get("conditions", []) if c["type"] == type_), None)

    def phase(self, phase: Phase, reason: str, message: str, *, warning: bool = False) -> None:
        if self.s.get("phase") != phase.value or self.s.get("reason", reason) != reason:
            self.events.append(Event("Warning" if warning else "Normal", reason, message))
        if self.s.get("phase") != phase.value:
            goodput.enter_phase(self.s.setdefault("goodput", {}), self.s.get("phase"), self.now)
        self.s["phase"] = phase.value
        self.s["reason"] = reason
        self.s["message"] = message
        for p in (Phase.RUNNING, Phase.RESTARTING, Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):
            # A condition that turns False says why: the reason of the phase that replaced it.
            self.condition(p.value, p == phase, reason, message)


def set_condition(conds: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> bool:  # fmt: skip
    """Kubernetes-style condition bookkeeping, in place: lastTransitionTime moves only when the
    status flips, observedGeneration is the spec generation the condition was judged at, and a
    False condition that never was True is not listed. Returns whether anything changed."""
    value = "True" if status else "False"
    seen = {"observedGeneration": generation} if generation is not None else {}
    for c in conds:
        if c["type"] == type_:
            new = {"status": value, "reason": reason, "message": message, **seen}
            if all(c.get(k) == v for k, v in new.items()):
                return False
            if c["status"] != value:
                c["lastTransitionTime"] = rfc3339(now)
            c.update(new)
            return True
    if status:
        conds.append({"type": type_, "status": value, "reason": reason, "message": message,
                      "lastTransitionTime": rfc3339(now), **seen})  # fmt: skip
        return True
    return False


@dataclass
class _Reconcile:
    """One reconcile's view of a valid job: what every decision of `plan` reads and writes."""

    job: PretrainJob
    name: str
    namespace: str
    uid: str
    now: datetime
    st: _Status
    out: Plan
    observed: Observed
    nodes: int
    phase: str | None
    attempt: int = 0
    restarts: int = 0
    #: Time suspended (added to status.suspendedSeconds on resume), and how long since the
    #: resume when the job is suspended now (None otherwise).
    suspended: timedelta = timedelta(0)
    resumed_after: timedelta | None = None
    #: Node name -> why it is bad (NotReady, or a condition of runPolicy.badNodeConditions).
    bad_nodes: dict[str, NodeFault] = field(default_factory=dict)

    def delete_pods(self, pods: list[PodView]) -> None:
        self.out.delete.extend(("Pod", p.name) for p in pods)

    def done(self) -> Plan:
        """The plan, with every deletion of a pod on a bad node made a forced one, and the pods
        there already being deleted forced too."""
        on_bad = {p.name for p in self.observed.pods if p.node in self.bad_nodes}
        deleting = [p.name for p in self.observed.pods if p.name in on_bad and p.deleting]
        planned = [name for kind, name in self.out.delete if kind == "Pod" and name in on_bad]
        self.out.force_delete = list(dict.fromkeys(deleting + planned))
        self.out.delete = [(k, n) for k, n in self.out.delete if not (k == "Pod" and n in on_bad)]
        return _finish(self.out, self.st)


def plan(
    job: PretrainJob | None,
    *,
    name: str,
    namespace: str,
    uid: str,
    generation: int | None,
    status: dict[str, Any],
    observed: Observed,
    now: datetime,
    invalid: str | None = None,
    scheduling_grace: timedelta | None = None,
) -> Plan:
    """Decide what to do. `job` is None when the spec is invalid (`invalid` says why). A
    dispatcher over named decisions, in the order a job lives them."""
    st = _Status(status, now, generation)
    out = Plan()
    observed, others = own_children(observed, uid)
    live = [p for p in observed.pods if not p.deleting]
    if job is None:
        return _invalid(st, out, live, invalid or "invalid spec")
    _revalidated(st)
    low, high = size_range(job.spec)
    nodes = int(st.s.get("nodes") or 0)  # the current attempt's size: an elastic job's changes
    r = _Reconcile(job, name, namespace, uid, now, st, out, observed, nodes if low <= nodes <= high
                   else job.spec.resources.nodes, st.s.get("phase"))  # fmt: skip
    bad = job.spec.run_policy.bad_node_conditions
    r.bad_nodes = {n: why for n, view in observed.nodes.items() if (why := node_fault(view, bad))}
    if r.phase in TERMINAL:
        _finished(r, live)
        return r.done()
    _adopt_attempt(r)
    if job.spec.run_policy.suspend:
        _suspend(r, live)
        return r.done()
    if _past_deadline(r, live):
        return r.done()
    _shared_children(r)
    # Only earlier attempts are leftovers: pods of the current attempt, or of a later one a stale
    # view does not know of, are never deleted as such.
    r.delete_pods([p for p in live if p.attempt < r.attempt])
    current = [p for p in live if p.attempt == r.attempt and not p.standby]
    standby = [p for p in live if p.attempt == r.attempt and p.standby]
    lingering = [p for p in observed.pods if p.attempt < r.attempt or p.deleting]
    first = r.phase in (None, Phase.PENDING.value, Phase.PREPARING.value) and r.attempt == 0
    if r.phase == Phase.SUSPENDED.value or first:
        _begin(r, others, lingering)
    elif r.phase == Phase.RESTARTING.value:
        _restart(r, current, standby, lingering)
    else:
        _current_attempt(r, current, standby, scheduling_grace)
    return r.done()


def _invalid(st: _Status, out: Plan, live: list[PodView], why: str) -> Plan:
    st.condition("Invalid", True, "InvalidSpec", why)
    if st.s.get("phase") != Phase.FAILED.value:
        st.phase(Phase.FAILED, "InvalidSpec", why, warning=True)
        out.delete.extend(("Pod", p.name) for p in live)
    return _finish(out, st)


def _revalidated(st: _Status) -> None:
    """A spec that was invalid and is fixed: the Invalid condition turns False; a job it failed
    starts over."""
    was_invalid = st.get_condition("Invalid")
    if was_invalid and was_invalid["status"] == "True":
        st.condition("Invalid", False, "Valid", "the spec was fixed")
        if st.s.get("phase") == Phase.FAILED.value:
            for key in ("phase", "message", "completionTime"):
                st.s.pop(key, None)


def _finished(r: _Reconcile, live: list[PodView]) -> None:
    """A finished job: its pod cleanup policy, and the TTL that deletes it."""
    rp, st = r.job.spec.run_policy, r.st
    r.delete_pods([p for p in live if p.standby])
    if rp.clean_pod_policy == "All":
        r.delete_pods(live)
    elif rp.clean_pod_policy == "Running":
        r.delete_pods([p for p in live if p.phase in ("Running", "Pending", "Unknown")])
    # Job's habit: completionTime on success only; a failed job's end is its Failed condition's.
    ended = st.get_condition(str(r.phase))
    done = parse_time(st.s.get("completionTime")) or parse_time(ended.get("lastTransitionTime") if ended else None)
    ttl = rp.ttl_seconds_after_finished
    if ttl is None or not done:
        return
    if r.now < done + timedelta(seconds=ttl):
        r.out.due_in((done + timedelta(seconds=ttl) - r.now).total_seconds())
        return
    # the job goes, as Job, JobSet and TrainJob go; its children with it (owner references)
    r.out.delete_job = True
    st.events.append(Event("Normal", "TTLExpired", f"deleting the job {ttl}s after it ended "
                                                  "(runPolicy.ttlSecondsAfterFinished)"))  # fmt: skip


def _adopt_attempt(r: _Reconcile) -> None:
    r.attempt = int(r.st.s.get("attempt") or 0)
    r.restarts = int(r.st.s.get("restarts") or 0)
    r.st.s.setdefault("restarts", r.restarts)
    newest = max((p.attempt for p in r.observed.pods), default=0)
    if newest > r.attempt:
        # Pods of a later attempt than the status knows: this view of the status is stale, or the
        # status was reset. Adopt them; the status write is fenced by the resourceVersion the view
        # was read at, so a stale view's plan is refused before it acts.
        r.attempt = newest
        r.st.s["attempt"] = newest


def _suspend(r: _Reconcile, live: list[PodView]) -> None:
    r.delete_pods(live)
    if r.observed.prepare_job is not None and not r.observed.prepare_job.deleting:
        r.out.delete.append(("Job", prepare_job_name(r.name)))  # its parts stay: a resume redoes none
    if r.phase != Phase.SUSPENDED.value:
        r.st.phase(Phase.SUSPENDED, "Suspended", "runPolicy.suspend is set: pods deleted")


def _past_deadline(r: _Reconcile, live: list[PodView]) -> bool:
    """activeDeadlineSeconds of running time only: time suspended is added to
    status.suspendedSeconds when the job resumes; until then (old pods still going) the current
    stretch is counted here. True when the deadline passed (the job failed)."""
    rp, st = r.job.spec.run_policy, r.st
    r.suspended = timedelta(seconds=int(st.s.get("suspendedSeconds") or 0))
    if r.phase == Phase.SUSPENDED.value:
        cond = st.get_condition(Phase.SUSPENDED.value)
        since = parse_time(cond.get("lastTransitionTime")) if cond else None
        r.resumed_after = max(r.now - since, timedelta(0)) if since else timedelta(0)
        r.suspended += r.resumed_after
    started = parse_time(st.s.get("startTime"))
    if not rp.active_deadline_seconds or not started:
        return False
    deadline = started + r.suspended + timedelta(seconds=rp.active_deadline_seconds)
    r.out.due_in((deadline - r.now).total_seconds())
    if r.now < deadline:
        return False
    r.delete_pods(live)
    st.phase(Phase.FAILED, "DeadlineExceeded", f"ran longer than activeDeadlineSeconds ({rp.active_deadline_seconds}s)",
             warning=True)  # fmt: skip
    return True


def _shared_children(r: _Reconcile) -> None:
    """The Service, the ConfigMap (replaced when mutable fields changed: the next attempt's pods
    read the new config; CEL refuses the rest) and the PodMonitor."""
    job, observed, out = r.job, r.observed, r.out
    if not observed.service:
        out.create.append(build_service(job, r.namespace, r.uid))
    configmap = build_configmap(job, r.namespace, r.uid)
    if not observed.configmap:
        out.create.append(configmap)
    elif observed.config is not None and observed.config != configmap["data"][CONFIG_KEY]:
        out.replace.append(configmap)
    if job.spec.monitoring.pod_monitor and not observed.pod_monitor:
        out.create.append(build_pod_monitor(job, r.namespace, r.uid))


def _start_attempt(r: _Reconcile, new_attempt: int, reason: str, message: str) -> None:
    st = r.st
    if r.attempt:  # the attempt before ended (a restart, a resize, a resume): its trainer's time
        goodput.end_attempt(st.s.setdefault("goodput", {}), r.attempt, st.s, None)
    if new_attempt == 1:
        st.events.extend(Event("Warning", "NoCheckpointStorage", w) for w in spec_warnings(r.job.spec))
        st.condition("Created", True, "Created", f"the job's first pods were created ({r.nodes} node(s))")
    if r.resumed_after is not None and "startTime" in st.s:  # a resume of a job that had started
        st.s["suspendedSeconds"] = int(r.suspended.total_seconds())
    st.s["attempt"] = new_attempt
    st.s.setdefault("startTime", rfc3339(r.now))
    st.s["nodes"] = r.nodes
    avoid = avoided_nodes(st.s, r.now)
    if avoid:
        st.s["avoidedNodes"] = [n for n in st.s["avoidedNodes"] if n.get("node") in avoid]
    else:
        st.s.pop("avoidedNodes", None)
    if r.job.spec.resources.scheduler_name == VOLCANO:  # the group first: Volcano waits for it
        if r.attempt:
            r.out.delete.append(("PodGroup", pod_group_name(r.name, r.attempt)))
        r.out.create.append(build_volcano_pod_group(r.job, r.namespace, r.uid, new_attempt, r.nodes))
    for rank in range(r.nodes):
        r.out.create.append(build_pod(r.job, r.namespace, r.uid, new_attempt, rank, r.nodes, avoid))
    st.phase(Phase.PENDING, reason, message)
    st.condition("Unschedulable", False, "")


def _begin(r: _Reconcile, others: list[str], lingering: list[PodView]) -> None:
    """A new job (after its data preparation stage, if any) or a resumed one: the next attempt,
    once nothing of an earlier job or attempt is left."""
    if others and r.attempt == 0:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        r.st.phase(Phase.PENDING, "WaitingForPreviousJob",
                   f"waiting for {shown} of an earlier PretrainJob named {r.name} (or not owned by this job) to go")  # fmt: skip
        return
    if lingering:
        return  # wait for old pods to go before a fresh attempt
    if r.attempt == 0 and _preparing(r.st, r.out, r.job, r.namespace, r.uid, r.observed):
        return
    resumed = r.phase == Phase.SUSPENDED.value
    _start_attempt(r, r.attempt + 1, "Resumed" if resumed else "Created",
                   f"created {r.nodes} pod(s) for attempt {r.attempt + 1}")  # fmt: skip


def _restart(r: _Reconcile, current: list[PodView], standby: list[PodView], lingering: list[PodView]) -> None:
    """Restarting: the old gang deleted, then (after the backoff, not for a resize) the next attempt."""
    cond = r.st.get_condition(Phase.RESTARTING.value)
    since = parse_time(cond.get("lastTransitionTime")) if cond else None
    resizing = cond is not None and cond.get("reason") in RESIZE_REASONS
    wait = 0 if resizing else backoff_seconds(r.job, r.restarts)
    r.delete_pods(current + standby)
    waiting = bool(since and r.now < since + timedelta(seconds=wait))
    if since and waiting:
        r.out.due_in((since + timedelta(seconds=wait) - r.now).total_seconds())
    if lingering or current or waiting:
        return
    n = r.attempt + 1
    if resizing:
        _start_attempt(r, n, "Resized", f"attempt {n} on {r.nodes} node(s); {resumes_from(r.job)}")
    else:
        _start_attempt(r, n, "Restarted", f"attempt {n} after {r.restarts} restart(s); {resumes_from(r.job)}")


def _current_attempt(r: _Reconcile, current: list[PodView], standby: list[PodView],
                     scheduling_grace: timedelta | None) -> None:  # fmt: skip
    """The attempt's pods: a failed or vanished one fails the gang; missing ones are made; then
    an elastic resize, success, running, or pods that cannot start or be placed."""
    job, st, rp, attempt, nodes = r.job, r.st, r.job.spec.run_policy, r.attempt, r.nodes
    # A pod of the current attempt being deleted by someone else (an eviction, a preemption, a
    # drain, kubectl delete) is a failure of the gang as much as one that exited.
    gone = [p for p in r.observed.pods if p.attempt == attempt and p.deleting and not p.standby]
    failed = [p for p in current if p.phase in ("Failed", "Unknown")] + gone
    missing = sorted(set(range(nodes)) - {p.rank for p in current} - {p.rank for p in gone})
    on_bad = [p for p in current if p.node in r.bad_nodes and p.phase in ("Pending", "Running") and p not in failed
              and hit_by(r.bad_nodes[p.node], p.created)]  # fmt: skip
    if failed or on_bad or (missing and r.phase == Phase.RUNNING.value):
        first = first_failed([p.failed(deleted=p in gone) for p in failed]) if failed else None
        if first is None and on_bad:
            first = _on_bad_node(on_bad[0], r.bad_nodes)
            failed = on_bad
        verdict = decide(rp.failure_policy, first, None if first else pod_name(r.name, attempt, missing[0]))
        _avoid_node(r, failed, first, verdict)
        _gang_failed(st, r.out, job, verdict, current, r.restarts, r.now)
        return
    if missing:  # Pending and some pods not created yet (e.g. the operator stopped half-way)
        if job.spec.resources.scheduler_name == VOLCANO:  # and maybe their PodGroup (AlreadyExists is fine)
            r.out.create.append(build_volcano_pod_group(job, r.namespace, r.uid, attempt, nodes))
        for rank in missing:
            r.out.create.append(build_pod(job, r.namespace, r.uid, attempt, rank, nodes, avoided_nodes(st.s, r.now)))
        _check_scheduling(st, current, job, r.now, scheduling_grace)  # the new pods are not stuck
        return
    elastic = job.spec.resources.elastic is not None
    if elastic and _elastic(r, current, standby) is not None:
        return  # a resize: a planned restart at the new size
    if all(p.phase == "Succeeded" for p in current):
        _succeeded(r, current)
        return
    if all(p.phase in ("Running", "Succeeded") for p in current):
        stalled = _stalled(r, current)
        if stalled is not None:
            verdict = decide(rp.failure_policy, stalled)
            _avoid_node(r, current, stalled, verdict)
            _gang_failed(st, r.out, job, verdict, current, r.restarts, r.now)
            return
        _report_guard(st, job, attempt)
        _running(st, nodes, attempt)
        st.condition("Unschedulable", False, "")
        st.condition(CANNOT_START, False, "Started", "every container started")
        return
    if not _cannot_start(st, r.out, job, current, r.restarts, r.now):
        _unplaced(r, current, scheduling_grace)


def _succeeded(r: _Reconcile, current: list[PodView]) -> None:
    r.st.phase(Phase.SUCCEEDED, "Completed", f"all {r.nodes} pod(s) succeeded")
    r.st.s["completionTime"] = rfc3339(r.now)
    node0 = next((p for p in current if p.rank == 0), None)
    done = parse_done(node0.message) if node0 else None
    r.st.s.update(final_status(done, r.job.spec.checkpoint.uri))
    final = (done or {}).get("time")
    goodput.end_attempt(r.st.s.setdefault("goodput", {}), r.attempt, r.st.s, final if isinstance(final, dict) else None)
    if r.job.spec.run_policy.clean_pod_policy == "All":
        r.delete_pods(current)


def _unplaced(r: _Reconcile, current: list[PodView], scheduling_grace: timedelta | None) -> None:
    """Pods still Pending: past the scheduling timeout, the spec's action."""
    stuck = _check_scheduling(r.st, current, r.job, r.now, scheduling_grace)
    action = r.job.spec.run_policy.scheduling_timeout_action
    if not stuck or action == "Wait":
        return
    r.delete_pods(current)
    if action == "FailJob":
        r.st.phase(Phase.FAILED, "SchedulingTimeout", f"{stuck}; schedulingTimeoutAction is FailJob", warning=True)
    else:
        r.st.phase(Phase.SUSPENDED, "SchedulingTimeout",
                   f"{stuck}; suspended (runPolicy.suspend is now true): unset it to try again", warning=True)  # fmt: skip
        r.out.suspend_job = True


#: Verdict reasons of a failure that may be the node's (with a lost node among a pod's reasons).
NODE_FAULTS = ("PodFailed", STALLED)


def _on_bad_node(pod: PodView, bad_nodes: dict[str, NodeFault]) -> FailedPod:
    """A pod still Running (or Pending) in the API on a node gone bad, as a disrupted pod."""
    return FailedPod(name=pod.name, exit_code=None, reasons=(NODE_NOT_READY,), message=bad_nodes[str(pod.node)].why)


def avoided_nodes(status: dict[str, Any], now: datetime) -> tuple[str, ...]:
    """The nodes in status.avoidedNodes whose window has not passed."""
    out = []
    for entry in status.get("avoidedNodes") or []:
        until = parse_time(entry.get("until")) if isinstance(entry, dict) else None
        if until is not None and until > now and entry.get("node"):
            out.append(str(entry["node"]))
    return tuple(sorted(set(out)))


def _avoid_node(r: _Reconcile, pods: list[PodView], first: FailedPod | None, verdict: Verdict) -> None:
    """Keep the node of the gang's first failure out of the next attempts (preferably) for
    runPolicy.failedNodeAvoidanceSeconds, when the failure may be the node's: not an OOM, a
    deletion or a scheduler's disruption, which say nothing about the node."""
    seconds = r.job.spec.run_policy.failed_node_avoidance_seconds
    view = next((p for p in pods if first is not None and p.name == first.name), None)
    if not seconds or first is None or view is None or not view.node:
        return
    if verdict.reason not in NODE_FAULTS and not {"NodeLost", NODE_NOT_READY} & set(first.reasons):
        return
    until = rfc3339(r.now + timedelta(seconds=seconds))
    kept = [n for n in r.st.s.get("avoidedNodes") or [] if isinstance(n, dict) and n.get("node") != view.node]
    r.st.s["avoidedNodes"] = [*kept, {"node": view.node, "until": until, "reason": verdict.why[:300]}]
    r.st.events.append(Event("Warning", "NodeAvoided", f"the next attempts avoid node {view.node} until {until}: "
                                                       f"{verdict.why}"[:1000]))  # fmt: skip


def _gang_failed(st: _Status, out: Plan, job: PretrainJob, verdict: Verdict, current: list[PodView], restarts: int,
                 now: datetime) -> None:  # fmt: skip
    """Fail the job, or restart the gang (counted or not), as the failure policy's verdict says."""
    rp = job.spec.run_policy
    by_rule = f" ({verdict.rule}: {verdict.action})" if verdict.rule else ""
    if verdict.action == "FailJob" or (verdict.counts and restarts >= rp.max_restarts):
        if rp.clean_pod_policy != "None":
            out.delete.extend(("Pod", p.name) for p in current if p.phase in ("Running", "Pending"))
        if verdict.action == "FailJob":
            reason, tail = "FailedByPolicy", "the failure policy fails the job"
        else:
            reason, tail = "RestartsExhausted", f"{restarts} of {rp.max_restarts} restarts used"
        st.phase(Phase.FAILED, reason, f"{verdict.why}; {tail}{by_rule}", warning=True)
        goodput.end_attempt(st.s.setdefault("goodput", {}), int(st.s.get("attempt") or 0), st.s, None)
        return
    out.delete.extend(("Pod", p.name) for p in current)
    if verdict.counts:
        st.s["restarts"] = restarts + 1
        count = f"restart {restarts + 1} of {rp.max_restarts}"
    else:
        st.s["uncountedRestarts"] = int(st.s.get("uncountedRestarts") or 0) + 1
        count = "not counted against maxRestarts"
    wait = backoff_seconds(job, int(st.s["restarts"]))
    st.phase(Phase.RESTARTING, "GangRestart", f"{verdict.why}; restarting all pods in {wait}s ({count}){by_rule}",
             warning=True)  # fmt: skip


RESIZE_REASONS = ("Shrink", "Grow")


def _elastic(r: _Reconcile, current: list[PodView], standby: list[PodView]) -> int | None:
    """An elastic job's size: shrink when pods of the gang stay unscheduled past
    shrinkAfterSeconds (down to minNodes), grow when standby pods for the missing nodes run.
    A resize is a planned restart from the newest checkpoint: the pods are deleted (SIGTERM, so
    the trainer checkpoints at the end of its step) and the next attempt starts without backoff,
    not counted against maxRestarts. Returns the new size, or None when the size stays."""
    st, out, job, size, now = r.st, r.out, r.job, r.nodes, r.now
    e = job.spec.resources.elastic
    assert e is not None
    waiting = [p for p in current if p.phase == "Pending" and not p.scheduled]
    if waiting:
        out.delete.extend(("Pod", p.name) for p in standby)  # no growing while the gang cannot be placed
        since = min((p.created for p in waiting if p.created), default=now)
        due = since + timedelta(seconds=e.shrink_after_seconds)
        if now < due:
            st.due.append((due - now).total_seconds())
            return None
        new = fit(job.spec, len(current) - len(waiting))
        if new is None or new >= size:
            return None  # below minNodes: wait, as any gang does (schedulingTimeoutAction applies)
        message = (f"{len(waiting)} of {size} pod(s) could not be scheduled for {e.shrink_after_seconds}s: "
                   f"restarting on {new} node(s) from the newest checkpoint")  # fmt: skip
        _resize(st, out, current + standby, size, new, "Shrink", message)
        return new
    _, high = size_range(job.spec)
    if size >= high or not current or any(p.phase != "Running" for p in current):
        return None
    out.delete.extend(("Pod", p.name) for p in standby if p.phase in ("Failed", "Succeeded", "Unknown"))
    have = {p.rank for p in standby if p.phase not in ("Failed", "Succeeded", "Unknown")}
    out.create.extend(build_standby_pod(job, r.namespace, r.uid, r.attempt, rank) for rank in range(size, high)
                      if rank not in have)  # fmt: skip
    ready = [p for p in standby if p.phase == "Running"]
    new = fit(job.spec, size + len(ready))
    if new is None or new <= size:
        return None
    message = (f"{len(ready)} more node(s) can be placed: restarting on {new} node(s); the pods save a checkpoint "
               "on SIGTERM and the next attempt resumes from it")  # fmt: skip
    _resize(st, out, current + standby, size, new, "Grow", message)
    return new


def _resize(st: _Status, out: Plan, pods: list[PodView], old: int, new: int, reason: str, message: str) -> None:
    out.delete.extend(("Pod", p.name) for p in pods)
    count = int((st.s.get("resize") or {}).get("count") or 0) + 1
    st.s["nodes"] = new
    st.s["resize"] = {"fromNodes": old, "toNodes": new, "reason": reason, "message": message,
                      "time": rfc3339(st.now), "count": count}  # fmt: skip
    st.phase(Phase.RESTARTING, reason, message, warning=reason == "Shrink")


def resumes_from(job: PretrainJob) -> str:
    """Where a new attempt starts, truthfully: without checkpoint.uri the checkpoints were in
    the old pods' emptyDir, gone with them."""
    if job.spec.checkpoint.uri:
        return "resuming from the latest checkpoint"
    return "starting from step 0: checkpoint.uri is not set, so the checkpoints went with the old pods"


#: The condition of a job whose pods are placed but whose containers the kubelet cannot start.
CANNOT_START = "CannotStart"


def _cannot_start(st: _Status, out: Plan, job: PretrainJob, current: list[PodView], restarts: int,
                  now: datetime) -> bool:  # fmt: skip
    """Say why a placed pod does not start, in the kubelet's words (a wrong image is not a
    scheduling problem), and let a failure policy rule on the reason act on it. Returns whether
    the job failed or restarts (the plan is then complete)."""
    blocked = [p for p in current if p.phase == "Pending" and p.waiting is not None]
    if not blocked:
        st.condition(CANNOT_START, False, "Started", "no container is refused a start")
        return False
    pod = blocked[0]
    reason, message = pod.waiting or ("", "")
    verdict = decide_start_failure(job.spec.run_policy.failure_policy, FailedPod(pod.name, None, (reason,), message))
    if verdict is not None:
        _gang_failed(st, out, job, verdict, current, restarts, now)
        return True
    why = f"pod {pod.name} cannot start ({reason})" + (f": {message}" if message else "")
    st.phase(Phase.PENDING, reason, why, warning=True)
    st.condition(CANNOT_START, True, reason, why)
    st.condition("Unschedulable", False, "Scheduled", "the pods are placed")
    return False


def prepared_so_far(workers: list[PodView]) -> dict[str, int]:
    """Units, documents and tokens of the stage's workers that finished (each leaves its part's
    summary as its termination message; a worker that found the dataset done leaves none)."""
    total = {"units": 0, "documents": 0, "tokens": 0}
    for p in workers:
        summary = parse_prepared(p.message) if p.phase == "Succeeded" else None
        for k, v in (summary or {}).items():
            total[k] += v
    return total


def _preparing(st: _Status, out: Plan, job: PretrainJob, namespace: str, uid: str, observed: Observed) -> bool:
    """The data preparation stage before the first attempt (data.prepare): True while it runs
    (or failed), False once the data is prepared (or there is no stage)."""
    prep, view = job.spec.data.prepare, observed.prepare_job
    if prep is None or (st.s.get("preparation") or {}).get("done"):
        return False
    name, key = prepare_job_name(job.metadata.name), preparation_key(job)
    elsewhere = observed.prepared_elsewhere.get(key)
    if view is None and elsewhere and elsewhere != job.metadata.name:
        st.s["preparation"] = {"workers": prep.workers, "completed": 0, "done": True, "key": key,
                               "reusedFrom": elsewhere}  # fmt: skip
        st.events.append(Event("Normal", "Prepared", f"job {elsewhere} prepared the same data (sources, tokenizer, "
                               "sequence length, cacheUri): no preparation stage"))  # fmt: skip
        return False
    done = prepared_so_far(observed.prepare_workers)
    state: dict[str, Any] = {"workers": prep.workers, "completed": view.completed if view else 0, "key": key, **done}
    if view is not None and view.failed_indexes:
        state["failedIndexes"] = view.failed_indexes
    st.s["preparation"] = state
    if view is None:
        out.create.append(build_prepare_job(job, namespace, uid))
        st.phase(Phase.PREPARING, "Preparing", f"preparing the data: Job {name} with {prep.workers} worker(s)")
    elif view.failed:
        st.phase(Phase.FAILED, PREPARATION_FAILED, f"data preparation failed: Job {name}: {view.message} (failed "
                 f"workers {view.failed_indexes or '?'}: kubectl logs -l job-name={name})", warning=True)  # fmt: skip
    elif view.complete:
        state["done"] = True
        out.delete.append(("Job", name))
        st.events.append(Event("Normal", "Prepared", f"the data is prepared ({prep.workers} worker(s), Job {name}, "
                               f"{done['tokens']:,} tokens)"))  # fmt: skip
        return False
    else:
        st.phase(Phase.PREPARING, "Preparing", f"preparing the data: {view.completed} of {prep.workers} worker(s) "
                 f"done, {done['tokens']:,} tokens")  # fmt: skip
    return True


#: Beyond a stall limit, how stale node 0's scraped heartbeat may be: progress is scraped every
#: minute (`--progress-interval`), so a live trainer's heartbeat in the status lags by that much.
HEARTBEAT_SLACK_SECONDS = 180.0


def _stalled(r: _Reconcile, current: list[PodView]) -> FailedPod | None:
    """Node 0 of this attempt, as a failed pod of reason Stalled, when its last progress (the
    heartbeat scraped into status.progress) is older than its stall limit plus HEARTBEAT_SLACK
    (scrapes come every minute): its whole interpreter may be stuck, its watchdog with it.
    Else None, with a requeue for when it would be."""
    beat = (r.st.s.get("progress") or {}).get("heartbeat") or {}
    node0 = next((p for p in current if p.rank == 0 and p.phase == "Running"), None)
    if beat.get("attempt") != r.attempt or node0 is None or not beat.get("time"):
        return None
    limit = float(r.job.spec.run_policy.stall_timeout_seconds or beat.get("limitSeconds") or 0)
    if limit <= 0:
        return None
    last = parse_time(beat["time"])
    if last is None:
        return None
    idle = (r.now - last).total_seconds()
    if idle <= limit + HEARTBEAT_SLACK_SECONDS:
        r.st.due.append(limit + HEARTBEAT_SLACK_SECONDS - idle + 1)
        return None
    why = f"no progress for {idle:.0f}s (stall limit {limit:.0f}s): its last heartbeat was {beat['time']}"
    return FailedPod(node0.name, None, (STALLED,), why, r.now)


def _report_guard(st: _Status, job: PretrainJob, attempt: int) -> None:
    """One Warning event per new finding of node 0's loss guard (scraped into status.progress)."""
    found = (st.s.get("progress") or {}).get("guard") or {}
    told = st.s.get("guardEventsReported") or {}
    if found.get("attempt") != attempt or not found.get("events"):
        return
    if told.get("attempt") == attempt and int(told.get("events") or 0) >= int(found["events"]):
        return
    action = job.spec.training.guard.action
    st.events.append(Event("Warning", "LossGuard", f"node 0's loss guard found {found['events']} bad step(s) in "
                           f"attempt {attempt}, the last at step {found.get('lastStep')} (training.guard.action "
                           f"{action}); its log says what and where"))  # fmt: skip
    st.s["guardEventsReported"] = {"attempt": attempt, "events": int(found["events"])}


def _running(st: _Status, nodes: int, attempt: int) -> None:
    """Running; with reason StorageUnavailable while this attempt's node 0 retries a call to its
    storage (scraped into status.progress), so that pods that run but wait on an endpoint that
    does not answer are not shown as a job that trains."""
    retrying = (st.s.get("progress") or {}).get("storageRetrying") or {}
    if retrying.get("attempt") == attempt:
        st.phase(Phase.RUNNING, STORAGE_UNAVAILABLE, f"node 0 has been retrying since {retrying.get('since')}: "
                 f"{retrying.get('operation')} failed ({retrying.get('error')})", warning=True)  # fmt: skip
    elif st.s.get("phase") != Phase.RUNNING.value or st.s.get("reason") == STORAGE_UNAVAILABLE:
        st.phase(Phase.RUNNING, "Running", f"all {nodes} pod(s) running (attempt {attempt})")


def _check_scheduling(
    st: _Status, pods: list[PodView], job: PretrainJob, now: datetime, grace: timedelta | None
) -> str | None:
    """Raise the Unschedulable condition (and one event) for pods pending past the timeout;
    returns its message, or None while no pod has waited that long."""
    grace = grace or timedelta(seconds=job.spec.run_policy.scheduling_timeout_seconds)
    unplaced = [p for p in pods if p.phase == "Pending" and not p.scheduled]  # a placed pod is the kubelet's
    stuck = [p for p in unplaced if p.created and now >= p.created + grace]
    waiting = [p.created + grace - now for p in unplaced if p.created and now < p.created + grace]
    if waiting:
        st.due.append(min(waiting).total_seconds())
    if stuck:
        cond = st.get_condition("Unschedulable")
        said = f": {stuck[0].unschedulable}" if stuck[0].unschedulable else ""
        msg = f"{len(stuck)} pod(s) pending longer than {int(grace.total_seconds())}s (e.g. {stuck[0].name}{said})"
        if not cond or cond["status"] != "True":
            st.events.append(Event("Warning", "Unschedulable", msg))
        st.condition("Unschedulable", True, "PodsPending", msg)
        return msg
    return None


def _finish(out: Plan, st: _Status) -> Plan:
    out.delete = list(dict.fromkeys(out.delete))  # each once, in order
    out.status = st.s
    out.events = st.events
    for seconds in st.due:
        out.due_in(seconds)
    return out


def children_labels(name: str) -> dict[str, str]:
    return {LABEL_JOB: name}
