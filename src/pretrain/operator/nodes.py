"""A node's health as the operator reads it, to end an attempt whose node went bad at once.

When a node dies or is cut off, its pods stay `Running` in the API: the node lifecycle
controller only turns the node's Ready condition Unknown (after node-monitor-grace-period) and
evicts its pods minutes later (the unreachable taint's 300 s toleration), and those evictions
then hang in Terminating while no kubelet confirms them. Meanwhile the gang's other ranks wait in
a collective until its timeout. So the operator watches Nodes and fails the attempt as soon as
one of its pods' nodes is NotReady, or shows a condition the job names bad
(`runPolicy.badNodeConditions`: node-problem-detector's KernelDeadlock, a GPU health condition).
Pure functions here; the informer keeps the views.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pretrain.api.spec import NODE_NOT_READY
from pretrain.timestamps import parse_time

__all__ = ["NODE_NOT_READY", "NodeFault", "NodeView", "hit_by", "node_fault", "node_view"]


@dataclass(frozen=True)
class NodeView:
    """A node's conditions: (type, status, reason, message, lastTransitionTime), the heartbeat
    times left out so that a heartbeat is no change."""

    name: str
    conditions: tuple[tuple[str, str, str, str, str], ...] = ()


def node_view(obj: dict[str, Any]) -> NodeView:
    conds = (obj.get("status") or {}).get("conditions") or []
    return NodeView(
        name=str(obj["metadata"]["name"]),
        conditions=tuple(sorted(
            (str(c.get("type", "")), str(c.get("status", "")), str(c.get("reason") or ""),
             str(c.get("message") or "")[:300], str(c.get("lastTransitionTime") or ""))
            for c in conds if isinstance(c, dict)
        )),
    )  # fmt: skip


@dataclass(frozen=True)
class NodeFault:
    why: str  # a phrase for the status: "node n is NotReady: Ready is Unknown (...)"
    since: datetime | None  # the condition's lastTransitionTime


def node_fault(node: NodeView, bad_conditions: list[str]) -> NodeFault | None:
    """Why `node` is bad, or None: Ready False or Unknown (a node that never reported Ready is
    not judged), or a named condition True."""
    for type_, status, reason, message, since in node.conditions:
        said = (
            f" ({reason}: {message})" if reason and message else f" ({reason or message})" if reason or message else ""
        )
        if type_ == "Ready" and status in ("False", "Unknown"):
            return NodeFault(f"node {node.name} is NotReady: Ready is {status}{said}", parse_time(since))
        if type_ in bad_conditions and status == "True":
            return NodeFault(f"node {node.name} has condition {type_}{said}", parse_time(since))
    return None


def hit_by(fault: NodeFault, pod_created: datetime | None) -> bool:
    """Whether a pod bound to the node was there before it went bad. A pod created after the
    fault began and bound there anyway was placed once the node was back (the scheduler keeps
    off a NotReady node): the fault is a stale view of the node (its watch may lag the pods'),
    and judging the pod by it would end a healthy attempt."""
    return fault.since is None or pod_created is None or pod_created <= fault.since
