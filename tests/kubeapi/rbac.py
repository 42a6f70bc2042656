"""RBAC authorisation for the API emulator, as kube-apiserver's RBAC authorizer decides it.

The rules come from the objects `helm template` renders (Role, ClusterRole, RoleBinding,
ClusterRoleBinding); a request by a user they name is allowed when a binding of that user grants
its verb on its resource (or subresource, `pods/status`) in its API group, in its namespace
(a RoleBinding) or anywhere (a ClusterRoleBinding). Everything else is refused with the API
server's own 403 message. Non-resource paths (discovery, /version, /openapi) are open to every
authenticated user, as the `system:discovery` and `system:public-info-viewer` roles make them.
The emulator's own token stands for a cluster admin (the tests' kubectl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass(frozen=True)
class Request:
    user: str
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    resource: str  # with the subresource: "pods/status"
    namespace: str | None
    name: str | None


def _rule_allows(rule: Obj, req: Request) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    if not (has("verbs", req.verb) and has("apiGroups", req.group) and has("resources", req.resource)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (req.name is not None and req.name in names)


def _names_user(binding: Obj, user: str) -> bool:
    for s in binding.get("subjects") or []:
        if s.get("kind") == "ServiceAccount" and user == service_account_user(
            s.get("namespace", ""), s.get("name", "")
        ):
            return True
        if s.get("kind") == "User" and s.get("name") == user:
            return True
    return False


@dataclass
class Authorizer:
    roles: dict[tuple[str | None, str], list[Obj]] = field(default_factory=dict)  # (ns or None, name) -> rules
    bindings: list[Obj] = field(default_factory=list)

    def load(self, docs: list[Obj]) -> None:
        for d in docs:
            kind, meta = d.get("kind"), d.get("metadata") or {}
            if kind == "ClusterRole":
                self.roles[(None, meta["name"])] = d.get("rules") or []
            elif kind == "Role":
                self.roles[(meta.get("namespace", "default"), meta["name"])] = d.get("rules") or []
            elif kind in ("RoleBinding", "ClusterRoleBinding"):
                self.bindings.append(d)

    def allows(self, req: Request) -> bool:
        for b in self.bindings:
            if not _names_user(b, req.user):
                continue
            ref = b["roleRef"]
            bound_ns = (b.get("metadata") or {}).get("namespace", "default") if b["kind"] == "RoleBinding" else None
            if bound_ns is not None and req.namespace != bound_ns:
                continue  # a RoleBinding grants in its own namespace only
            role_ns = bound_ns if ref["kind"] == "Role" else None
            if any(_rule_allows(r, req) for r in self.roles.get((role_ns, ref["name"]), [])):
                return True
        return False


def forbidden_message(req: Request) -> str:
    """kube-apiserver's words for a refused request."""
    resource = req.resource.partition("/")[0]
    what = resource + (f' "{req.name}"' if req.name else "")
    scope = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    return (f'{what} is forbidden: User "{req.user}" cannot {req.verb} resource "{req.resource}" in API group '
            f'"{req.group}" {scope}')  # fmt: skip
