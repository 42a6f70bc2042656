"""The object store of the API emulator, with the API server's semantics the operator relies on.

Each rule here is the documented behaviour of kube-apiserver (tests/kubeapi/test_semantics.py pins
each one):
- every write bumps a cluster-wide `metadata.resourceVersion`; an update that carries a stale one
  is refused with 409 Conflict; creating an existing name is 409 AlreadyExists;
- `metadata.generation` starts at 1 and grows only when something other than metadata and status
  changes;
- with a status subresource, writes to the object keep the old status and writes to `/status`
  change nothing but status;
- delete of an object with finalizers only sets `deletionTimestamp`; it goes when the last
  finalizer is removed; no finalizer may be added once it is set;
- a pod bound to a node is deleted gracefully (deletionTimestamp plus grace period) until the
  kubelet confirms with a zero grace period; an unbound pod goes at once;
- ownerReference garbage collection, asynchronously as the real collector: background deletes the
  dependents after the owner, foreground keeps the owner (finalizer `foregroundDeletion`) until its
  blocking dependents are gone, orphan removes the dependents' references;
- watch events (ADDED, MODIFIED, DELETED) with resourceVersions, replayable from a recent version
  and 410 Gone for a compacted one, filtered by label and field selectors the way the watch cache
  filters them (an object leaving a selector is DELETED for that watcher).

The store is single-threaded: the HTTP server calls it from its event loop only.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import random
import re
import string
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.kubeapi import batch
from tests.kubeapi import schema as crd_schema
from tests.kubeapi.selectors import FieldSelector, LabelSelector

Obj = dict[str, Any]


class ApiError(Exception):
    """An API error as the server's `Status` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Obj:
        out: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": self.message, "reason": self.reason, "code": self.code}  # fmt: skip
        if self.details:
            out["details"] = self.details
        return out


@dataclass
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    status_subresource: bool = False
    subresources: list[str] = field(default_factory=list)
    schema: Obj | None = None  # openAPIV3Schema of a custom resource
    printer_columns: list[Obj] = field(default_factory=list)
    has_generation: bool = False
    validate_builtin: bool = True  # against the official schemas (kubernetes-validate)
    #: What a DELETE without a propagationPolicy does to the object's dependents.
    default_propagation: str = "Background"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


def now_iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_suffix(n: int = 5) -> str:
    return "".join(random.choice(string.ascii_lowercase + "0123456789") for _ in range(n))


DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def _name_errors(res: Resource, name: str) -> list[str]:
    if res.kind in ("Service", "Namespace"):
        ok, rule, limit = DNS1035_LABEL.match(name) if res.kind == "Service" else DNS1123_LABEL.match(name), "label", 63
    else:
        ok, rule, limit = DNS1123_SUBDOMAIN.match(name), "subdomain", 253
    errs = []
    if not ok:
        errs.append(
            f"metadata.name: Invalid value: {name!r}: a {'DNS-1035' if res.kind == 'Service' else 'lowercase RFC 1123'} {rule} must consist of lower case alphanumeric characters or '-'"
        )
    if len(name) > limit:
        errs.append(f"metadata.name: Invalid value: {name!r}: must be no more than {limit} characters")
    return errs


#: The API server's rule for environment variable names (validation.IsEnvVarName).
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def _resource_errors(index: int, resources: Obj) -> list[str]:
    """A request above its limit, in the API server's words."""
    from pretrain.api.quantity import quantity

    errs = []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for name, want in requests.items():
        cap = limits.get(name)
        if cap is not None and quantity(str(want)) > quantity(str(cap)):
            errs.append(f"spec.containers[{index}].resources.requests: Invalid value: {str(want)!r}: must be less "
                        f"than or equal to {name} limit of {cap}")  # fmt: skip
    return errs


def _label_errors(labels: dict[str, Any]) -> list[str]:
    errs = []
    for k, v in (labels or {}).items():
        prefix, _, name = k.rpartition("/")
        if not LABEL_NAME.match(name) or len(name) > 63 or (prefix and not DNS1123_SUBDOMAIN.match(prefix)):
            errs.append(
                f"metadata.labels: Invalid value: {k!r}: name part must consist of alphanumeric characters, '-', '_' or '.'"
            )
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            errs.append(
                f"metadata.labels: Invalid value: {v!r}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.' (at most 63)"
            )
    return errs


def _owner_errors(refs: list[Obj]) -> list[str]:
    errs = []
    for i, r in enumerate(refs or []):
        for f in ("apiVersion", "kind", "name", "uid"):
            if not r.get(f):
                errs.append(f"metadata.ownerReferences[{i}].{f}: Required value")
    if sum(1 for r in refs or [] if r.get("controller")) > 1:
        errs.append("metadata.ownerReferences: Invalid value: only one reference can have Controller set to true")
    return errs


@dataclass
class WatchEvent:
    rv: int
    type: str
    resource: tuple[str, str]
    obj: Obj
    old: Obj | None


@dataclass
class Watcher:
    resource: tuple[str, str]
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    queue: asyncio.Queue[WatchEvent | None]

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels") or {}) and self.fields.matches(obj)

    def translate(self, ev: WatchEvent) -> WatchEvent | None:
        """The event as this watcher sees it through its selectors."""
        if ev.resource != self.resource:
            return None
        now, before = self.matches(ev.obj), self.matches(ev.old)
        if ev.type == "DELETED":
            return ev if before or now else None
        if now and not before and ev.type == "MODIFIED":
            return WatchEvent(ev.rv, "ADDED", ev.resource, ev.obj, ev.old)
        if before and not now:
            return WatchEvent(ev.rv, "DELETED", ev.resource, ev.obj, ev.old)
        return ev if now else None


class Store:
    """Objects by resource, namespace and name, and the semantics above."""

    #: How many events a watch can be resumed from (older versions answer 410 Gone).
    HISTORY = 20000
    #: Seconds the garbage collector waits before acting (it is asynchronous in a cluster too).
    GC_DELAY = 0.05

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.resources: dict[tuple[str, str], Resource] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self.rv = itertools.count(100)
        self.last_rv = 99
        self.history: deque[WatchEvent] = deque(maxlen=self.HISTORY)
        self.watchers: list[Watcher] = []
        self.clock = clock or (lambda: datetime.now(UTC).replace(microsecond=0, tzinfo=None))
        self.on_register: list[Callable[[Resource], None]] = []
        self.requests: list[tuple[str, str]] = []  # (verb, resource plural): what clients asked
        #: Extra admission on create (a test's ResourceQuota or webhook): an ApiError refuses.
        self.admission: list[Callable[[Resource, Obj], ApiError | None]] = []

    # ------------------------------------------------------------------ resources

    def register(self, res: Resource) -> None:
        self.resources[res.key] = res
        self.objects.setdefault(res.key, {})

    def unregister(self, key: tuple[str, str]) -> None:
        self.resources.pop(key, None)
        self.objects.pop(key, None)

    def resource(self, group: str, version: str, plural: str) -> Resource:
        res = self.resources.get((group, plural))
        if res is None or res.version != version:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return res

    def _crd_changed(self, crd: Obj | None, removed: bool = False) -> None:
        """Register (or drop) the resource a CustomResourceDefinition declares."""
        if crd is None:
            return
        spec = crd["spec"]
        key = (spec["group"], spec["names"]["plural"])
        if removed:
            self.unregister(key)
            return
        version = next(v for v in spec["versions"] if v.get("served", True))
        subs = version.get("subresources") or {}
        self.register(Resource(
            group=spec["group"], version=version["name"], plural=spec["names"]["plural"], kind=spec["names"]["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=spec["names"].get("singular", spec["names"]["kind"].lower()),
            short_names=spec["names"].get("shortNames", []), categories=spec["names"].get("categories", []),
            status_subresource="status" in subs, subresources=list(subs),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            printer_columns=version.get("additionalPrinterColumns") or [], has_generation=True, validate_builtin=False,
        ))  # fmt: skip
        for cb in self.on_register:
            cb(self.resources[key])

    # ------------------------------------------------------------------ helpers

    def _bucket(self, res: Resource) -> dict[tuple[str, str], Obj]:
        return self.objects.setdefault(res.key, {})

    def _get(self, res: Resource, ns: str | None, name: str) -> Obj:
        obj = self._bucket(res).get((ns or "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{self._rname(res)} "{name}" not found',
                           {"name": name, "group": res.group, "kind": res.plural})  # fmt: skip
        return obj

    @staticmethod
    def _rname(res: Resource) -> str:
        return f"{res.plural}.{res.group}" if res.group else res.plural

    def _emit(self, res: Resource, type_: str, obj: Obj, old: Obj | None) -> None:
        ev = WatchEvent(int(obj["metadata"]["resourceVersion"]), type_, res.key, copy.deepcopy(obj),
                        copy.deepcopy(old) if old is not None else None)  # fmt: skip
        self.history.append(ev)
        for w in list(self.watchers):
            seen = w.translate(ev)
            if seen is not None:
                w.queue.put_nowait(seen)

    def _next_rv(self) -> str:
        self.last_rv = next(self.rv)
        return str(self.last_rv)

    def _check_namespace(self, res: Resource, ns: str | None) -> None:
        if res.namespaced and ns and ("", ns) not in self._bucket(self.resources[("", "namespaces")]):
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})  # fmt: skip

    def _invalid(self, res: Resource, name: str, errors: list[str], causes: list[Obj] | None = None) -> ApiError:
        msg = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        return ApiError(422, "Invalid", f'{res.kind}{"." + res.group if res.group else ""} "{name}" is invalid: {msg}',
                        {"name": name, "group": res.group, "kind": res.kind,
                         "causes": causes or [{"reason": "FieldValueInvalid", "message": e} for e in errors]})  # fmt: skip

    def _admit(self, res: Resource, new: Obj, old: Obj | None, strict: bool) -> list[str]:
        """Schema admission (custom resources) or official-schema validation (built-in kinds)."""
        meta = new["metadata"]
        name = meta.get("name", "")
        errors = _label_errors(meta.get("labels") or {}) + _owner_errors(meta.get("ownerReferences") or [])
        for k, v in (meta.get("annotations") or {}).items():
            if not isinstance(v, str):
                errors.append(f"metadata.annotations: Invalid value: {k!r}: values must be strings")
        if errors:
            raise self._invalid(res, name, errors)
        warnings: list[str] = []
        if res.schema is not None:
            problems, warnings = crd_schema.admit(new, old, res.schema, strict)
            unknown = [p for p in problems if p.detail.startswith("unknown field")]
            if unknown:  # strict field validation fails decoding, before admission
                raise ApiError(400, "BadRequest", f'{res.kind} in version "{res.version}" cannot be handled as a '
                               f"{res.kind}: strict decoding error: " + ", ".join(p.detail for p in unknown))  # fmt: skip
            if problems:
                causes = [{"reason": p.reason, "message": p.detail, "field": p.field} for p in problems]
                raise self._invalid(res, name, [str(p) for p in problems], causes)
        elif res.validate_builtin:
            import kubernetes_validate as kv

            if res.kind == "Job":
                batch.default_job(new)
                if errs := batch.job_errors(new, old):
                    raise self._invalid(res, name, errs)

            try:
                kv.validate(new, "1.35", strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                raise self._invalid(res, name, [f"{where}: {e.message}"]) from None
            if res.kind == "Pod":
                self._pod_rules(res, new)
        return warnings

    def _pod_rules(self, res: Resource, pod: Obj) -> None:
        spec = pod["spec"]
        errs = []
        for key in ("hostname", "subdomain"):
            v = spec.get(key)
            if v is not None and (not DNS1123_LABEL.match(v) or len(v) > 63):
                errs.append(
                    f"spec.{key}: Invalid value: {v!r}: a lowercase RFC 1123 label must be at most 63 characters"
                )
        names = [c["name"] for c in spec.get("containers", [])]
        if len(set(names)) != len(names):
            errs.append("spec.containers: Duplicate value")
        vols = {v["name"] for v in spec.get("volumes", [])}
        for i, c in enumerate(spec.get("containers", [])):
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols:
                    errs.append(f"spec.containers[{i}].volumeMounts.name: Not found: {m['name']!r}")
            errs += _resource_errors(i, c.get("resources") or {})
            for e in c.get("env") or []:
                if not ENV_NAME.match(str(e.get("name", ""))):
                    errs.append(f"spec.containers[{i}].env[].name: Invalid value: {e.get('name')!r}: a valid "
                                "environment variable name must consist of alphabetic characters, digits, '_', '-', "
                                "or '.', and must not start with a digit")  # fmt: skip
        if errs:
            raise self._invalid(res, pod["metadata"]["name"], errs)

    # ------------------------------------------------------------------ verbs

    def create(
        self, res: Resource, ns: str | None, body: Obj, *, strict: bool = False, dry_run: bool = False
    ) -> tuple[Obj, list[str]]:
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        if obj["kind"] != res.kind or obj["apiVersion"] != res.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({obj['apiVersion']}) does not match the expected API version ({res.api_version})",
            )
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        self._check_namespace(res, ns)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise self._invalid(res, "", ["metadata.name: Required value: name or generateName is required"])
            meta["name"] = meta["generateName"] + _random_suffix()
        name = meta["name"]
        errs = _name_errors(res, name)
        if errs:
            raise self._invalid(res, name, errs)
        bucket = self._bucket(res)
        if ((ns or "") if res.namespaced else "", name) in bucket:
            raise ApiError(409, "AlreadyExists", f'{self._rname(res)} "{name}" already exists',
                           {"name": name, "group": res.group, "kind": res.plural})  # fmt: skip
        for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                  "generation", "selfLink", "managedFields"):  # fmt: skip
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso(self.clock())
        if res.has_generation:
            meta["generation"] = 1
        if res.status_subresource:
            obj.pop("status", None)  # status is the subresource's to write
        if res.kind == "Pod":
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        if res.kind == "Secret":
            _secret_string_data(obj)
        warnings = self._admit(res, obj, None, strict)
        for check in self.admission:
            refusal = check(res, obj)
            if refusal is not None:
                raise refusal
        if dry_run:
            return obj, warnings
        meta["resourceVersion"] = self._next_rv()
        bucket[(meta.get("namespace", ""), name)] = obj
        self._emit(res, "ADDED", obj, None)
        if res.kind == "CustomResourceDefinition":
            self._crd_changed(obj)
        return copy.deepcopy(obj), warnings

    def get(self, res: Resource, ns: str | None, name: str) -> Obj:
        return copy.deepcopy(self._get(res, ns, name))

    def list(
        self, res: Resource, ns: str | None, labels: LabelSelector, fields: FieldSelector
    ) -> tuple[list[Obj], str]:
        items = [
            copy.deepcopy(o) for (ons, _), o in sorted(self._bucket(res).items())
            if (not ns or ons == ns) and labels.matches(o["metadata"].get("labels") or {}) and fields.matches(o)
        ]  # fmt: skip
        return items, str(self.last_rv)

    def update(self, res: Resource, ns: str | None, name: str, body: Obj, *, subresource: str | None = None,
               strict: bool = False) -> tuple[Obj, list[str]]:  # fmt: skip
        old = self._get(res, ns, name)
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {self._rname(res)} "{name}": the object has been modified; '
                           "please apply your changes to the latest version and try again",
                           {"name": name, "group": res.group, "kind": res.plural})  # fmt: skip
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new.setdefault("apiVersion", res.api_version)
            new.setdefault("kind", res.kind)
            nm = new.setdefault("metadata", {})
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace",
                      "generation"):  # fmt: skip
                if k in old["metadata"]:
                    nm[k] = old["metadata"][k]
                else:
                    nm.pop(k, None)
            nm["name"] = name
            if res.status_subresource or res.kind == "Pod":
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            if res.kind == "Secret":
                _secret_string_data(new)
            if res.kind == "Pod" and _pod_spec_change(old, new):
                raise self._invalid(res, name, ["spec: Forbidden: pod updates may not change fields other than "
                                                "`spec.containers[*].image`, `spec.activeDeadlineSeconds`, "
                                                "`spec.tolerations` (only additions to existing tolerations)"])  # fmt: skip
            if old["metadata"].get("deletionTimestamp"):
                added = set(nm.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
                if added:
                    raise self._invalid(
                        res,
                        name,
                        [
                            f"metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}"
                        ],
                    )
        warnings = self._admit(res, new, old, strict) if subresource != "status" or res.schema is not None else []
        if res.has_generation and subresource != "status" and _spec_changed(old, new):
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        if _same(old, new):
            return copy.deepcopy(old), warnings  # a no-op write keeps the resourceVersion (and sends no event)
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._bucket(res)[(old["metadata"].get("namespace", ""), name)] = new
        if (
            new["metadata"].get("deletionTimestamp")
            and not new["metadata"].get("finalizers")
            and not _graceful_pod(res, new)
        ):
            return self._remove(res, new), warnings
        self._emit(res, "MODIFIED", new, old)
        if res.kind == "CustomResourceDefinition":
            self._crd_changed(new)
        return copy.deepcopy(new), warnings

    def delete(self, res: Resource, ns: str | None, name: str, *, propagation: str | None = None,
               grace: int | None = None, precondition_uid: str | None = None,
               precondition_rv: str | None = None) -> Obj:  # fmt: skip
        obj = self._get(res, ns, name)
        meta = obj["metadata"]
        if precondition_uid and precondition_uid != meta["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {precondition_uid}, UID in object meta: {meta['uid']}",
            )
        if precondition_rv and precondition_rv != meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: ResourceVersion in precondition: {precondition_rv}, ResourceVersion in object meta: {meta['resourceVersion']}",
            )
        old = copy.deepcopy(obj)
        if res.kind == "Pod" and obj["spec"].get("nodeName"):
            g = grace if grace is not None else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            if g > 0:
                if not meta.get("deletionTimestamp") or g < int(meta.get("deletionGracePeriodSeconds") or 0):
                    meta["deletionTimestamp"] = now_iso(self.clock() + timedelta(seconds=g))
                    meta["deletionGracePeriodSeconds"] = g
                    meta["resourceVersion"] = self._next_rv()
                    self._emit(res, "MODIFIED", obj, old)
                return copy.deepcopy(obj)
        policy = propagation or res.default_propagation
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers and not meta.get("deletionTimestamp"):
            finalizers.append("foregroundDeletion")
        if policy == "Orphan" and "orphan" not in finalizers and not meta.get("deletionTimestamp"):
            finalizers.append("orphan")
        if finalizers:
            changed = finalizers != (meta.get("finalizers") or []) or not meta.get("deletionTimestamp")
            meta["finalizers"] = finalizers
            meta.setdefault("deletionTimestamp", now_iso(self.clock()))
            meta.setdefault("deletionGracePeriodSeconds", 0)
            if changed:
                meta["resourceVersion"] = self._next_rv()
                self._emit(res, "MODIFIED", obj, old)
                self._schedule_gc()
            return copy.deepcopy(obj)
        return self._remove(res, obj)

    def bind(self, ns: str, name: str, node: str) -> None:
        res = self.resources[("", "pods")]
        pod = self._get(res, ns, name)
        if pod["spec"].get("nodeName"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        old = copy.deepcopy(pod)
        pod["spec"]["nodeName"] = node
        pod["status"].setdefault("conditions", []).append(
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso(self.clock())}
        )
        pod["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "MODIFIED", pod, old)

    # ------------------------------------------------------------------ removal and garbage collection

    def _remove(self, res: Resource, obj: Obj) -> Obj:
        meta = obj["metadata"]
        self._bucket(res).pop((meta.get("namespace", ""), meta["name"]), None)
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "DELETED", gone, obj)
        if res.kind == "CustomResourceDefinition":
            self._crd_changed(obj, removed=True)
        if res.kind == "Namespace":
            for r in list(self.resources.values()):
                if r.namespaced:
                    for (ons, _oname), o in list(self._bucket(r).items()):
                        if ons == meta["name"]:
                            self._remove(r, o)
        self._schedule_gc()
        return gone

    def _schedule_gc(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.collect_garbage()
            return
        loop.call_later(self.GC_DELAY, self.collect_garbage)

    def _uids(self) -> dict[str, tuple[Resource, Obj]]:
        return {o["metadata"]["uid"]: (r, o) for r in self.resources.values() for o in self._bucket(r).values()}

    def collect_garbage(self) -> None:
        """One pass of the garbage collector over every object with owner references."""
        changed = True
        while changed:
            changed = False
            live = self._uids()
            for res, obj in [(r, o) for r, o in live.values()]:
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                if refs and (meta.get("namespace", ""), meta["name"]) in self._bucket(res):
                    owners = [live.get(r["uid"]) for r in refs]
                    present = [o for o in owners if o is not None]
                    if not present:
                        if not meta.get("deletionTimestamp"):
                            self.delete(res, meta.get("namespace"), meta["name"], propagation="Background")
                            changed = True
                        continue
                    for _ores, owner in present:
                        ofin = owner["metadata"].get("finalizers") or []
                        if "foregroundDeletion" in ofin and not meta.get("deletionTimestamp"):
                            self.delete(res, meta.get("namespace"), meta["name"], propagation="Foreground")
                            changed = True
                        elif "orphan" in ofin:
                            old = copy.deepcopy(obj)
                            meta["ownerReferences"] = [r for r in refs if r["uid"] != owner["metadata"]["uid"]]
                            meta["resourceVersion"] = self._next_rv()
                            self._emit(res, "MODIFIED", obj, old)
                            changed = True
            for res, obj in list(self._uids().values()):
                meta = obj["metadata"]
                fin = meta.get("finalizers") or []
                if not meta.get("deletionTimestamp"):
                    continue
                if "foregroundDeletion" in fin and not self._dependents(meta["uid"], blocking=True):
                    self._drop_finalizer(res, obj, "foregroundDeletion")
                    changed = True
                elif "orphan" in fin and not self._dependents(meta["uid"], blocking=False):
                    self._drop_finalizer(res, obj, "orphan")
                    changed = True

    def _dependents(self, uid: str, blocking: bool) -> list[Obj]:
        return [
            o for _, o in self._uids().values()
            if any(r["uid"] == uid and (r.get("blockOwnerDeletion") or not blocking) for r in o["metadata"].get("ownerReferences") or [])
        ]  # fmt: skip

    def _drop_finalizer(self, res: Resource, obj: Obj, name: str) -> None:
        old = copy.deepcopy(obj)
        obj["metadata"]["finalizers"] = [f for f in obj["metadata"]["finalizers"] if f != name]
        if not obj["metadata"]["finalizers"]:
            self._remove(res, obj)
            return
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "MODIFIED", obj, old)

    # ------------------------------------------------------------------ watches

    def watch(self, res: Resource, ns: str | None, labels: LabelSelector, fields: FieldSelector,
              since: str | None) -> Watcher:  # fmt: skip
        """Register a watcher and queue what it must see first (current objects, or history)."""
        w = Watcher(res.key, ns, labels, fields, asyncio.Queue())
        if since in (None, "", "0"):
            for obj in self.list(res, ns, labels, fields)[0]:
                w.queue.put_nowait(WatchEvent(int(obj["metadata"]["resourceVersion"]), "ADDED", res.key, obj, None))
        else:
            try:
                start = int(since)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resource version: {since}") from None
            oldest = self.history[0].rv if self.history else self.last_rv + 1
            if start < oldest - 1 and start < self.last_rv:
                raise ApiError(410, "Expired", f"too old resource version: {start} ({oldest - 1})")
            for ev in self.history:
                if ev.rv > start:
                    seen = w.translate(ev)
                    if seen is not None:
                        w.queue.put_nowait(seen)
        self.watchers.append(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        if w in self.watchers:
            self.watchers.remove(w)

    def compact(self) -> None:
        """Forget the event history (as etcd compaction does): older versions answer 410."""
        self.history.clear()
        self.last_rv = next(self.rv)


def _secret_string_data(obj: Obj) -> None:
    """stringData is write-only: merged into data as base64, as the API server does."""
    data = obj.setdefault("data", {}) or {}
    for k, v in (obj.pop("stringData", None) or {}).items():
        data[k] = base64.b64encode(str(v).encode()).decode()
    obj["data"] = data


def _strip(obj: Obj) -> Obj:
    out = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    return out


def _spec_changed(old: Obj, new: Obj) -> bool:
    return _strip(old) != _strip(new)


def _same(old: Obj, new: Obj) -> bool:
    a, b = copy.deepcopy(old), copy.deepcopy(new)
    for o in (a, b):
        o["metadata"].pop("resourceVersion", None)
    return a == b


def _graceful_pod(res: Resource, obj: Obj) -> bool:
    return (
        res.kind == "Pod"
        and bool(obj["spec"].get("nodeName"))
        and int(obj["metadata"].get("deletionGracePeriodSeconds") or 0) > 0
    )


def _pod_spec_change(old: Obj, new: Obj) -> bool:
    a, b = copy.deepcopy(old.get("spec", {})), copy.deepcopy(new.get("spec", {}))
    for s in (a, b):
        s.pop("activeDeadlineSeconds", None)
        s.pop("tolerations", None)
        for c in s.get("containers", []):
            c.pop("image", None)
    return a != b
