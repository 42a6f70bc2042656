"""The emulator's HTTP face: the Kubernetes REST paths, discovery, Table output and watch streams,
on aiohttp (already installed with Kopf), served on loopback from a thread of the test process.

Real clients talk to it unchanged: the `kubernetes` Python client, Kopf (`pretrain operator` in a
process of its own) and the `kubectl` binary, each through a kubeconfig that `ApiServer` writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from tests.kubeapi import patches
from tests.kubeapi.rbac import Authorizer, Request, forbidden_message
from tests.kubeapi.selectors import FieldSelector, LabelSelector
from tests.kubeapi.store import ApiError, Obj, Resource, Store, WatchEvent

T = TypeVar("T")

BUILTIN = [
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, singular="namespace", short_names=["ns"]),
    Resource("", "v1", "pods", "Pod", singular="pod", short_names=["po"], categories=["all"],
             subresources=["status", "binding", "log"], has_generation=True),
    Resource("", "v1", "nodes", "Node", namespaced=False, singular="node", short_names=["no"],
             subresources=["status"]),
    Resource("", "v1", "services", "Service", singular="service", short_names=["svc"], categories=["all"],
             subresources=["status"]),
    Resource("", "v1", "configmaps", "ConfigMap", singular="configmap", short_names=["cm"]),
    Resource("", "v1", "secrets", "Secret", singular="secret"),
    Resource("", "v1", "events", "Event", singular="event", short_names=["ev"]),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", singular="serviceaccount", short_names=["sa"]),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", singular="lease"),
    Resource("batch", "v1", "jobs", "Job", singular="job", categories=["all"], subresources=["status"],
             status_subresource=True, has_generation=True, default_propagation="Orphan"),
    Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
             namespaced=False, singular="customresourcedefinition", short_names=["crd", "crds"],
             subresources=["status"], has_generation=True, validate_builtin=True),
]  # fmt: skip
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def human_age(seconds: float) -> str:
    """kubectl's duration.HumanDuration, which the API server uses for Age cells."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d{h % 24}h" if h % 24 else f"{h // 24}d"
    return f"{h // 24}d"


def _verb_of(request: web.Request, name: str | None) -> str:
    """The RBAC verb of a request, as the API server's request-info resolver names it."""
    method = request.method
    if method == "GET" or method == "HEAD":
        if name is not None:
            return "get"
        return "watch" if request.query.get("watch") in ("true", "1") else "list"
    if method == "DELETE":
        return "delete" if name is not None else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _jsonpath(obj: Obj, path: str) -> Any:
    node: Any = obj
    for part in path.strip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class ApiServer:
    """The emulator, started in a background thread: `url`, `kubeconfig`, and `call` to reach
    the store from test code on the server's own loop (the store is single-threaded)."""

    def __init__(self, workdir: Path) -> None:
        self.store = Store()
        for res in BUILTIN:
            self.store.register(copy.deepcopy(res))
        ns_res = self.store.resources[("", "namespaces")]
        for ns in ("default", "kube-system", "kube-public"):
            self.store.create(ns_res, None, {"metadata": {"name": ns}})
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="kube-api-emulator")
        self._ready = threading.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Queue[WatchEvent | None]] = set()
        #: RBAC for the identities `kubeconfig_for` made (the emulator's own token is an admin).
        self.authorizer = Authorizer()
        self.users: dict[str, str] = {}  # bearer token -> user
        self.refusals: list[str] = []  # every 403, for tests to show

    # ------------------------------------------------------------------ lifecycle

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ApiServer:
        self._thread.start()
        self._ready.wait(10)
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": "default"}}],
        }))  # fmt: skip
        return self

    def stop(self) -> None:
        async def _close() -> None:
            for q in list(self._streams):
                q.put_nowait(None)
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def kubeconfig_for(self, user: str, rbac: list[Obj], path: Path) -> Path:
        """A kubeconfig for `user` (a service account's user name), whose requests are
        authorised against the Roles, ClusterRoles and bindings in `rbac` (helm template's)."""
        import secrets

        token = secrets.token_hex(16)
        self.users[token] = user
        self.authorizer.load(rbac)
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": "tester", "user": {"token": token}}]
        path.write_text(yaml.safe_dump(config))
        return path

    def _authorize(self, request: web.Request, verb: str, res: Resource, ns: str | None, name: str | None,
                   sub: str | None) -> None:  # fmt: skip
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        user = self.users.get(token)
        if user is None:
            return  # the emulator's own token: a cluster admin
        req = Request(user, verb, res.group, res.plural + (f"/{sub}" if sub else ""), ns, name)
        if not self.authorizer.allows(req):
            message = forbidden_message(req)
            self.refusals.append(message)
            raise ApiError(403, "Forbidden", message, {"name": name or "", "group": res.group, "kind": res.plural})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(store, ...)` on the server's loop and return its result."""

        async def run() -> T:
            return fn(self.store, *args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def install_crd(self, path: Path) -> None:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                self.call(
                    lambda s, d=doc: s.create(
                        s.resources[("apiextensions.k8s.io", "customresourcedefinitions")], None, d
                    )
                )

    def objects(self, plural: str, group: str = "", namespace: str | None = "default") -> list[Obj]:
        def read(s: Store) -> list[Obj]:
            res = s.resources.get((group, plural))
            return s.list(res, namespace, LabelSelector(), FieldSelector())[0] if res else []

        return self.call(read)

    # ------------------------------------------------------------------ routing

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return web.json_response({"major": "1", "minor": "35", "gitVersion": "v1.35.0-emulator",
                                      "platform": "linux/amd64"})  # fmt: skip
        if parts[0] == "openapi":
            return self._openapi(parts[1:])
        if parts[0] == "api":
            if len(parts) == 1:
                return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})  # fmt: skip
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                return web.json_response(self._group_list())
            if len(parts) == 2:
                return web.json_response(self._group(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        ns: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        self.store.requests.append((request.method.lower(), rest[0]))  # refused ones count too
        res = self.store.resource(group, version, rest[0])
        if res.namespaced is False and ns is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in res.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._authorize(request, _verb_of(request, name), res, ns, name, sub)
        return await self._verb(request, res, ns, name, sub)

    async def _verb(self, request: web.Request, res: Resource, ns: str | None, name: str | None,
                    sub: str | None) -> web.StreamResponse:  # fmt: skip
        q = request.query
        strict = q.get("fieldValidation") == "Strict"
        dry_run = q.get("dryRun") == "All"
        method = request.method
        if method == "GET" and name is None:
            labels = LabelSelector.parse(q.get("labelSelector"))
            fields = FieldSelector.parse(q.get("fieldSelector"), res.kind)
            if q.get("watch") in ("true", "1"):
                return await self._watch(request, res, ns, labels, fields)
            items, rv = self.store.list(res, ns, labels, fields)
            if self._wants_table(request):
                return web.json_response(self._table(res, items, rv, q.get("includeObject", "Metadata")))
            return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                      "metadata": {"resourceVersion": rv}, "items": items})  # fmt: skip
        if method == "GET" and sub == "log":
            assert name is not None and ns is not None
            return await self._pod_log(request, ns, name)
        if method == "GET":
            assert name is not None
            obj = self.store.get(res, ns, name)
            if self._wants_table(request):
                return web.json_response(self._table(res, [obj], obj["metadata"]["resourceVersion"],
                                                     q.get("includeObject", "Metadata")))  # fmt: skip
            return web.json_response(obj)
        body = await self._body(request)
        if method == "POST" and sub == "binding":
            assert name is not None and ns is not None
            self.store.bind(ns, name, body["target"]["name"])
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}, status=201
            )
        if method == "POST" and name is None:
            obj, warnings = self.store.create(res, ns, body, strict=strict, dry_run=dry_run)
            return self._respond(obj, warnings, 201)
        if method == "PUT" and name is not None:
            obj, warnings = self.store.update(res, ns, name, body, subresource=sub, strict=strict)
            return self._respond(obj, warnings)
        if method == "PATCH" and name is not None and request.content_type == patches.APPLY:
            return self._apply(res, ns, name, body, sub, strict)
        if method == "PATCH" and name is not None:
            ctype = request.content_type
            current = self.store.get(res, ns, name)
            if ctype == patches.MERGE:
                new = patches.merge_patch(current, body)
            elif ctype == patches.JSON:
                new = patches.json_patch(current, body)
            elif ctype == patches.STRATEGIC and res.schema is None:
                new = patches.strategic_merge_patch(current, body)
            else:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types include: "
                               f"{patches.JSON}, {patches.MERGE}" + ("" if res.schema is not None else f", {patches.STRATEGIC}"))  # fmt: skip
            # A patch is applied to the current object: its resourceVersion is a precondition only
            # when the patch itself sets one.
            patch_rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
            new.setdefault("metadata", {})["resourceVersion"] = patch_rv or current["metadata"]["resourceVersion"]
            obj, warnings = self.store.update(res, ns, name, new, subresource=sub, strict=strict)
            return self._respond(obj, warnings)
        if method == "DELETE" and name is not None:
            opts = body if isinstance(body, dict) else {}
            propagation = q.get("propagationPolicy") or opts.get("propagationPolicy")
            grace = q.get("gracePeriodSeconds") or opts.get("gracePeriodSeconds")
            pre = opts.get("preconditions") or {}
            obj = self.store.delete(res, ns, name, propagation=propagation, grace=int(grace) if grace is not None else None,
                                    precondition_uid=pre.get("uid"), precondition_rv=pre.get("resourceVersion"))  # fmt: skip
            return web.json_response(obj)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        """`pods/log` as the API server serves it: the pod's node found, and the request passed
        on to that node's kubelet (its Node's InternalIP and kubeletEndpoint port), streamed."""
        import aiohttp

        pod = self.store.get(self.store.resources[("", "pods")], ns, name)
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = request.query.get("container") or (names[0] if len(names) == 1 else None)
        if container is None:
            raise ApiError(400, "BadRequest", f"a container name must be specified for pod {name}, "
                           f"choose one of: [{' '.join(names)}]")  # fmt: skip
        if container not in names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        node_name = pod["spec"].get("nodeName")
        if not node_name:
            raise ApiError(400, "BadRequest", f"pod {name} does not have a host assigned")
        node = self.store.get(self.store.resources[("", "nodes")], None, node_name)
        ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        query = {k: v for k, v in request.query.items() if k in ("follow", "tailLines", "limitBytes", "previous")}
        url = f"http://{ip}:{port}/containerLogs/{ns}/{name}/{container}"
        async with aiohttp.ClientSession() as session, session.get(url, params=query) as upstream:
            if upstream.status != 200:
                raise ApiError(upstream.status, "BadRequest", (await upstream.text()).strip())
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    def _apply(self, res: Resource, ns: str | None, name: str, body: Obj, sub: str | None,
               strict: bool) -> web.Response:  # fmt: skip
        """Server-side apply, in part: the applied configuration creates the object, or is merged
        into it (RFC 7386). Field ownership (managedFields, conflicts between managers, removal
        of fields a manager stopped applying) is not kept: nothing here relies on it."""
        try:
            current = self.store.get(res, ns, name)
        except ApiError as e:
            if e.code != 404 or sub is not None:
                raise
            obj, warnings = self.store.create(res, ns, body, strict=strict)
            return self._respond(obj, warnings, 201)
        new = patches.merge_patch(current, body)
        new.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        obj, warnings = self.store.update(res, ns, name, new, subresource=sub, strict=strict)
        return self._respond(obj, warnings)

    @staticmethod
    async def _body(request: web.Request) -> Any:
        if "protobuf" in request.content_type or "cbor" in request.content_type:
            raise ApiError(415, "UnsupportedMediaType", f"the emulator speaks JSON only, not {request.content_type}")
        raw = await request.read()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"the body of the request could not be decoded: {e}") from None

    @staticmethod
    def _respond(obj: Obj, warnings: list[str], code: int = 200) -> web.Response:
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return web.json_response(obj, status=code, headers=headers)

    # ------------------------------------------------------------------ discovery

    def _groups(self) -> dict[str, str]:
        return {r.group: r.version for r in self.store.resources.values() if r.group}

    def _group(self, group: str) -> Obj:
        version = self._groups().get(group)
        if version is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        gv = {"groupVersion": f"{group}/{version}", "version": version}
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv}

    def _group_list(self) -> Obj:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group(g) for g in sorted(self._groups())]}  # fmt: skip

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        for r in self.store.resources.values():
            if r.group != group or r.version != version:
                continue
            resources.append({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                              "verbs": VERBS, "shortNames": r.short_names, "categories": r.categories})  # fmt: skip
            for sub in r.subresources:
                verbs = {"binding": ["create"], "log": ["get"]}.get(sub, ["get", "patch", "update"])
                kind = {"binding": "Binding", "log": "Pod"}.get(sub, r.kind)
                resources.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                                  "kind": kind, "verbs": verbs})  # fmt: skip
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}".strip("/"),
                "resources": resources}  # fmt: skip

    def _openapi(self, parts: list[str]) -> web.Response:
        """Just enough OpenAPI for kubectl: no v2 schemas (an empty protobuf document: kubectl
        skips client-side validation of kinds it has no schema for), and v3 documents whose PATCH
        operations declare `fieldValidation`, so that kubectl asks for server-side validation
        (fieldValidation=Strict) as it does against a real 1.35 API server."""
        if parts == ["v2"]:
            return web.Response(body=b"", content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
        gvs = sorted({(r.group, r.version) for r in self.store.resources.values()})

        def gv_path(g: str, v: str) -> str:
            return f"apis/{g}/{v}" if g else f"api/{v}"

        if parts == ["v3"]:
            return web.json_response({"paths": {gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{gv_path(g, v)}?hash={self.store.last_rv}"}
                                                for g, v in gvs}})  # fmt: skip
        want = "/".join(parts[1:])
        for g, v in gvs:
            if gv_path(g, v) != want:
                continue
            paths: Obj = {}
            schemas: Obj = {}
            for r in self.store.resources.values():
                if (r.group, r.version) != (g, v):
                    continue
                if r.schema is not None:  # a CRD's: what `kubectl explain` reads
                    name = ".".join([*reversed(g.split(".")), v, r.kind])
                    gvk = [{"group": g, "kind": r.kind, "version": v}]
                    schemas[name] = {**r.schema, "x-kubernetes-group-version-kind": gvk}
                base = f"/{gv_path(g, v)}/" + ("namespaces/{namespace}/" if r.namespaced else "") + r.plural + "/{name}"
                op = {"x-kubernetes-action": "patch", "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}],
                    "x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": r.kind},
                    "responses": {"200": {"description": "OK"}}}  # fmt: skip
                paths[base] = {"patch": op, "put": {**op, "x-kubernetes-action": "put"}}
            return web.json_response({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.35.0"},
                                      "paths": paths, "components": {"schemas": schemas}})  # fmt: skip
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    # ------------------------------------------------------------------ tables

    @staticmethod
    def _wants_table(request: web.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    def _columns(self, res: Resource) -> list[tuple[Obj, Callable[[Obj], Any]]]:
        def age(o: Obj) -> str:
            created = datetime.strptime(o["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
            return human_age((self.store.clock() - created).total_seconds())

        name_col = ({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0},
                    lambda o: o["metadata"]["name"])  # fmt: skip
        age_col = ({"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0}, age)
        if res.printer_columns:
            cols: list[tuple[Obj, Callable[[Obj], Any]]] = [name_col]
            for c in res.printer_columns:
                definition = {"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                              "description": c.get("description", ""), "priority": c.get("priority", 0)}  # fmt: skip
                if c["type"] == "date":

                    def cell(o: Obj, p: str = c["jsonPath"]) -> Any:
                        v = _jsonpath(o, p)
                        if not v:
                            return None
                        return human_age(
                            (self.store.clock() - datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ")).total_seconds()
                        )
                else:

                    def cell(o: Obj, p: str = c["jsonPath"]) -> Any:
                        return _jsonpath(o, p)

                cols.append((definition, cell))
            return cols
        if res.kind == "Pod":

            def ready(o: Obj) -> str:
                st = (o.get("status") or {}).get("containerStatuses") or []
                return f"{sum(1 for s in st if s.get('ready'))}/{len(o['spec'].get('containers', []))}"

            def phase(o: Obj) -> str:
                if o["metadata"].get("deletionTimestamp"):
                    return "Terminating"
                for s in (o.get("status") or {}).get("containerStatuses") or []:
                    term = (s.get("state") or {}).get("terminated")
                    if term and term.get("reason"):
                        return str(term["reason"])
                return str((o.get("status") or {}).get("phase", "Pending"))

            def restarts(o: Obj) -> int:
                return sum(
                    int(s.get("restartCount", 0)) for s in (o.get("status") or {}).get("containerStatuses") or []
                )

            return [name_col,
                    ({"name": "Ready", "type": "string", "format": "", "description": "", "priority": 0}, ready),
                    ({"name": "Status", "type": "string", "format": "", "description": "", "priority": 0}, phase),
                    ({"name": "Restarts", "type": "string", "format": "", "description": "", "priority": 0}, restarts),
                    age_col,
                    ({"name": "IP", "type": "string", "format": "", "description": "", "priority": 1},
                     lambda o: (o.get("status") or {}).get("podIP", "<none>")),
                    ({"name": "Node", "type": "string", "format": "", "description": "", "priority": 1},
                     lambda o: o["spec"].get("nodeName", "<none>"))]  # fmt: skip
        return [name_col, age_col]

    def _table(self, res: Resource, items: list[Obj], rv: str, include: str) -> Obj:
        cols = self._columns(res)
        rows = []
        for o in items:
            row: Obj = {"cells": [fn(o) for _, fn in cols]}
            if include == "Object":
                row["object"] = o
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                }
            rows.append(row)
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
                "columnDefinitions": [d for d, _ in cols], "rows": rows}  # fmt: skip

    # ------------------------------------------------------------------ watch

    async def _watch(self, request: web.Request, res: Resource, ns: str | None, labels: LabelSelector,
                     fields: FieldSelector) -> web.StreamResponse:  # fmt: skip
        q = request.query
        initial = q.get("sendInitialEvents") == "true"
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        try:
            watcher = self.store.watch(res, ns, labels, fields, None if initial else q.get("resourceVersion"))
        except ApiError as e:
            if e.code != 410:
                raise
            # The watch cache answers a compacted version with an ERROR event on a 200 stream.
            await resp.prepare(request)
            await resp.write((json.dumps({"type": "ERROR", "object": e.status()}) + "\n").encode())
            await resp.write_eof()
            return resp
        table = self._wants_table(request)
        await resp.prepare(request)
        self._streams.add(watcher.queue)
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = self.loop.time() + timeout
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        try:
            if initial:
                # watch-list: the current state as ADDED, then a bookmark marking its end
                pending = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
                for ev in pending:
                    if ev is not None:
                        await self._send(resp, res, ev, table)
                await resp.write((json.dumps({"type": "BOOKMARK", "object": {
                    "kind": res.kind, "apiVersion": res.api_version, "metadata": {
                        "resourceVersion": str(self.store.last_rv),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}}) + "\n").encode())  # fmt: skip
            while True:
                left = deadline - self.loop.time()
                if left <= 0:
                    break
                try:
                    ev = await asyncio.wait_for(watcher.queue.get(), timeout=min(left, 5.0))
                except TimeoutError:
                    if bookmarks:
                        await resp.write((json.dumps({"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(self.store.last_rv)}}}) + "\n").encode())  # fmt: skip
                    continue
                if ev is None:
                    break
                await self._send(resp, res, ev, table)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(watcher)
            self._streams.discard(watcher.queue)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _send(self, resp: web.StreamResponse, res: Resource, ev: WatchEvent, table: bool) -> None:
        obj = self._table(res, [ev.obj], str(ev.rv), "Object") if table else ev.obj
        await resp.write((json.dumps({"type": ev.type, "object": obj}) + "\n").encode())
