"""Label selectors (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`) and field selectors
(`metadata.name=x`, `involvedObject.uid!=y`, ...), parsed as the API server parses them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tests.kubeapi.store_errors import bad_request

_SET = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*$")


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


@dataclass
class LabelSelector:
    requirements: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        out = cls()
        for part in _split(text or ""):
            if m := _SET.match(part):
                out.requirements.append((m.group(1), m.group(2), tuple(v.strip() for v in m.group(3).split(","))))
            elif m := _EQ.match(part):
                op = "!=" if m.group(2) == "!=" else "="
                out.requirements.append((m.group(1), op, (m.group(3),)))
            elif m := _EXISTS.match(part):
                out.requirements.append((m.group(2), "!" if m.group(1) else "exists", ()))
            else:
                raise bad_request(f"unable to parse requirement: {part!r}")
        return out

    def matches(self, labels: dict[str, str]) -> bool:
        for key, op, values in self.requirements:
            have = key in labels
            value = labels.get(key)
            if (
                (op == "=" and value != values[0])
                or (op == "!=" and have and value == values[0])
                or (op == "in" and value not in values)
                or (op == "notin" and have and value in values)
                or (op == "exists" and not have)
                or (op == "!" and have)
            ):
                return False
        return True


#: Field selectors each resource supports (besides metadata.name and metadata.namespace).
SUPPORTED_FIELDS = {
    "Pod": {
        "spec.nodeName",
        "status.phase",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "Event": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "Secret": {"type"},
    "Namespace": {"status.phase"},
}


def _lookup(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    if path == "source" and obj.get("kind") == "Event":
        return str((obj.get("source") or {}).get("component", ""))
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


@dataclass
class FieldSelector:
    requirements: list[tuple[str, bool, str]] = field(default_factory=list)  # (path, equal, value)

    @classmethod
    def parse(cls, text: str | None, kind: str) -> FieldSelector:
        out = cls()
        allowed = {"metadata.name", "metadata.namespace"} | SUPPORTED_FIELDS.get(kind, set())
        for part in _split(text or ""):
            m = _EQ.match(part)
            if not m:
                raise bad_request(f"invalid selector: {part!r}; can't understand {part!r}")
            if m.group(1) not in allowed:
                raise bad_request(f"field label not supported: {m.group(1)}")
            out.requirements.append((m.group(1), m.group(2) != "!=", m.group(3)))
        return out

    def matches(self, obj: dict[str, Any]) -> bool:
        return all((_lookup(obj, path) == value) == equal for path, equal, value in self.requirements)
