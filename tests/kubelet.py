"""A stand-in node (scheduler and kubelet) that talks to the API server like the real ones.

It watches pods through the API (the `kubernetes` client's watch), binds each new pod to its node
through the `binding` subresource (the scheduler's call), reports it ContainerCreating, starts the
container's command and args (with Kubernetes' `$(VAR)` expansion) as a local process tree, with
the pod's env (values, the downward-API fields, ConfigMap and Secret references read from the API,
`envFrom` Secrets) and its ConfigMap volumes written to a folder, and writes the pod status back
through `pods/status` as a kubelet does: phase, podIP, conditions, containerStatuses with state
waiting (the kubelet's reasons), running or terminated (exit code, reason Completed/Error, and the
log tail as message when terminationMessagePolicy is FallbackToLogsOnError). A pod marked for
deletion gets SIGTERM, SIGKILL after its grace period, then the kubelet's final delete with a zero
grace period. It registers its Node and serves container logs for `pods/log` (kubelet_logs.py).
It renews its node's Lease in kube-node-lease (the heartbeat the node lifecycle controller reads,
tests/nodecontroller.py) and kills the containers of pods gone from the API. `die()` plays a node
that is lost (powered off, cut off): its processes frozen, no heartbeat, nothing synced, so
graceful deletions of its pods hang in Terminating; `revive()` brings it back as a kubelet
restarting: the containers of pods deleted meanwhile killed, Ready again.

What it substitutes, as a real node would differ from this machine: mount paths (to folders of
its own), each pod's IP (127.0.0.<n>; node 0's DNS name is resolved as cluster DNS would, through
the headless Service, and written into the env once), the rendezvous port (a free one per gang),
the compiled-extension cache (shared, like an image layer), and PATH (this virtual environment).
Never the command, the args' meaning, or the trainer config.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain.contract import RENDEZVOUS_PORT
from tests import containers
from tests.kubelet_logs import LogServer, LogSource
from tests.loops import sync_until

VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
log = logging.getLogger("tests.kubelet")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (unknown references stay as written)."""
    return VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def signal_tree(pid: int, sig: int) -> None:
    """Signal a pod's processes as a container runtime does: SIGKILL reaches every process (the
    cgroup is killed; torchrun starts its workers in sessions of their own, so a process group is
    not enough), any other signal only the container's first process, PID 1: on a pod's
    deletion SIGTERM reaches torchrun alone, which must pass it on to its workers."""
    import psutil

    try:
        root = psutil.Process(pid)
        whole = sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT)  # a cgroup kill, freeze or thaw
        procs = [root, *root.children(recursive=True)] if whole else [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


#: Where kubelets keep their nodes' heartbeat Leases.
NODE_LEASE_NAMESPACE = "kube-node-lease"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: str
    term_sent: float | None = None
    reported: bool = False
    container: str = ""


@dataclass
class Kubelet:
    """One node: `start()` runs its watch and sync threads until `stop()`."""

    kubeconfig: Path
    root: Path
    namespace: str = "default"
    node: str = "node-0"
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, PodProcess] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    #: Pods the node takes at most (None: any number), as a scheduler sees a node's allocatable
    #: resources: a pod beyond it stays Pending, unbound, with PodScheduled False (Unschedulable).
    #: Lower it to play a node that is gone and cannot come back; raise it to bring one back.
    capacity: int | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # the watch's view
    errors: list[str] = field(default_factory=list)
    #: "process" runs a pod's command as a local process tree (fast); "podman" runs the pod as a
    #: real container of its image (tests/containers.py), with its securityContext and volumes.
    runtime: str = "process"
    #: Images this node can pull (None: any, in process mode); podman mode asks podman. A pod of
    #: another image waits with ErrImagePull, then ImagePullBackOff, as the kubelet reports it.
    images: set[str] | None = None
    _pull_tries: dict[str, int] = field(default_factory=dict)
    _retry_at: dict[str, float] = field(default_factory=dict)  # a refused start is tried again then
    #: Seconds a bound pod stays ContainerCreating (an image pull, volume mounts) before it starts.
    create_seconds: float = 0.0
    _creating: dict[str, float] = field(default_factory=dict)  # pod uid -> when its container is created
    _next_ip: int = 10
    _ports: dict[str, int] = field(default_factory=dict)  # gang (master address) -> rendezvous port
    #: Seconds between renewals of the node's Lease (a kubelet's default: 10).
    heartbeat_seconds: float = 1.0

    def __post_init__(self) -> None:
        import kubernetes

        self.k = kubernetes
        self.client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self._stop = threading.Event()
        self._dead = threading.Event()
        self._lock = threading.Lock()
        self.log_server = LogServer(self._log_source)
        self._threads = [threading.Thread(target=self._watch, daemon=True, name="kubelet-watch"),
                         threading.Thread(target=self._sync_loop, daemon=True, name="kubelet-sync"),
                         threading.Thread(target=self._heartbeat_loop, daemon=True, name="kubelet-heartbeat")]  # fmt: skip

    # ------------------------------------------------------------------ threads

    def start(self) -> Kubelet:
        self.log_server.start()
        self._register_node()
        for t in self._threads:
            t.start()
        return self

    def _register_node(self) -> None:
        """The Node object a kubelet keeps: its address and the port the API server reaches it
        on for `pods/log` (status.daemonEndpoints.kubeletEndpoint)."""
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": {
                    "kubernetes.io/hostname": self.node}},
                "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                         {"type": "Hostname", "address": self.node}],
                           "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
                           "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                           "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}]}}  # fmt: skip
        try:
            self.core.create_node(node)
        except self.k.client.ApiException as e:
            if e.status != 409:
                raise
        self.core.patch_node_status(self.node, {"status": node["status"]})

    def _heartbeat_loop(self) -> None:
        sync_until(self._stop, self._heartbeat, self.errors, "kubelet heartbeat", self.heartbeat_seconds)

    def _heartbeat(self) -> None:
        if not self._dead.is_set():
            self._renew_lease()

    def _renew_lease(self) -> None:
        """Renew the node's Lease (kube-node-lease/<node>), creating it (and the namespace) first."""
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": NODE_LEASE_NAMESPACE},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40,
                          "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}  # fmt: skip
        leases = self.k.client.CoordinationV1Api(self.client)
        try:
            leases.patch_namespaced_lease(self.node, NODE_LEASE_NAMESPACE, {"spec": lease["spec"]})
        except self.k.client.ApiException as e:
            if e.status != 404:
                raise
            with contextlib.suppress(self.k.client.ApiException):
                self.core.create_namespace({"metadata": {"name": NODE_LEASE_NAMESPACE}})
            leases.create_namespaced_lease(NODE_LEASE_NAMESPACE, lease)

    def die(self) -> None:
        """The node is lost: its processes frozen (as a machine that hangs or is cut off), no
        heartbeat, nothing bound, started, reported or confirmed."""
        self._dead.set()
        for pp in list(self.processes.values()):
            if pp.proc.poll() is None:
                self._signal(pp, signal.SIGSTOP)

    def revive(self) -> None:
        """The node is back (a kubelet restarting): containers of pods no longer in the API are
        killed, the rest thawed; Ready True again; syncing as before."""
        with self._lock:
            present = {n for n, p in self.pods.items() if p["metadata"].get("uid")}
        for name, pp in list(self.processes.items()):
            if pp.proc.poll() is None:
                self._signal(pp, signal.SIGKILL if name not in present else signal.SIGCONT)
        # the lease and Ready first, as a kubelet starting does: no pod is bound to a node that
        # is not Ready (the scheduler keeps off its not-ready taint)
        self._renew_lease()
        self._register_node()
        self._dead.clear()

    def stop(self) -> None:
        self._stop.set()
        self.log_server.stop()
        for pp in self.processes.values():
            self._signal(pp, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                pp.proc.wait(10)
        sync = self._threads[1]
        sync.join(10)
        # The watch thread only updates the pod view, and sits in a stream for up to 5 s: not
        # waited for (a daemon thread), so that each node's stop does not cost those seconds.
        self._threads[0].join(0.5)
        assert not sync.is_alive(), "the kubelet's sync thread did not stop"

    def _watch(self) -> None:
        """List, then watch from the list's resourceVersion (re-list on 410 Gone), as informers do."""
        while not self._stop.is_set():
            try:
                listed = self.client.sanitize_for_serialization(self.core.list_namespaced_pod(self.namespace))
                with self._lock:
                    self.pods = {p["metadata"]["name"]: p for p in listed["items"]}
                rv = listed["metadata"]["resourceVersion"]
                w = self.k.watch.Watch()
                for ev in w.stream(self.core.list_namespaced_pod, self.namespace, resource_version=rv,
                                   timeout_seconds=5, _request_timeout=10):  # fmt: skip
                    obj = self.client.sanitize_for_serialization(ev["object"])
                    with self._lock:
                        if ev["type"] == "DELETED":
                            self.pods.pop(obj["metadata"]["name"], None)
                        elif ev["type"] in ("ADDED", "MODIFIED"):
                            self.pods[obj["metadata"]["name"]] = obj
                    if self._stop.is_set():
                        break
            except Exception as e:  # the API went away or expired the version: list again
                if not self._stop.is_set():
                    log.debug("kubelet watch restarts: %s", e)
                    time.sleep(0.2)

    def _sync_loop(self) -> None:
        sync_until(self._stop, self.sync, self.errors, "kubelet")

    # ------------------------------------------------------------------ env and volumes

    def _rendezvous_port(self, pod: dict[str, Any]) -> int:
        """The rendezvous port of the pod's gang. In a cluster each pod has a network namespace
        of its own, so every gang's node 0 listens on 29500; pods here share the host's, so each
        gang (named by its node 0, the master address) gets a free port of its own: one port for
        the whole node once hid that two jobs on one node clash."""
        gang = next((e.get("value", "") for e in pod["spec"]["containers"][0].get("env", [])
                     if e.get("name") == "PRETRAIN_MASTER_ADDR"), pod["metadata"]["name"])  # fmt: skip
        if gang not in self._ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._ports[gang] = int(s.getsockname()[1])
        return self._ports[gang]

    def _secret(self, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, self.namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _configmap(self, name: str) -> dict[str, str]:
        return self.core.read_namespaced_config_map(name, self.namespace).data or {}

    def _resolve_env(self, pod: dict[str, Any], ip: str) -> dict[str, str]:
        c = pod["spec"]["containers"][0]
        env: dict[str, str] = {}
        for ref in c.get("envFrom", []):
            env.update(self._secret(ref["secretRef"]["name"]))
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                env[e["name"]] = self._field(pod, src["fieldRef"]["fieldPath"], ip)
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                env[e["name"]] = self._configmap(ref["name"])[ref["key"]]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                env[e["name"]] = self._secret(ref["name"])[ref["key"]]
        return env

    def _field(self, pod: dict[str, Any], path: str, ip: str) -> str:
        """A downward-API field: the pod's name, namespace, IP, node, or one label or annotation."""
        meta = pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        return {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "status.podIP": ip,
                "spec.nodeName": self.node}[path]  # fmt: skip

    def _mounts(self, pod: dict[str, Any], base: Path) -> dict[str, Path]:
        """mountPath -> local folder, with ConfigMap volumes written out."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out: dict[str, Path] = {}
        for m in pod["spec"]["containers"][0].get("volumeMounts") or []:
            if m["mountPath"] == "/dev/shm":
                continue  # this machine's /dev/shm serves
            local = base / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            v = volumes[m["name"]]
            if "configMap" in v:
                for key, text in self._configmap(v["configMap"]["name"]).items():
                    (local / key).write_text(text)
            out[m["mountPath"]] = local
        return out

    def ip_of(self, pod_name: str) -> str:
        if pod_name not in self.ips:
            self.ips[pod_name] = f"127.0.0.{self._next_ip}"
            self._next_ip += 1
        return self.ips[pod_name]

    def _log_source(self, namespace: str, name: str, container: str) -> LogSource | str:
        """A container's log, or the kubelet's reason it has none yet."""
        with self._lock:
            pod = self.pods.get(name)
        if pod is None or namespace != self.namespace:
            return f'pod "{name}" not found on node {self.node}'
        names = [c["name"] for c in pod["spec"]["containers"]]
        if container not in names:
            return f"container {container} is not valid for pod {name}"
        pp = self.processes.get(name)
        if pp is None:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            waiting = next(((cs.get("state") or {}).get("waiting") for cs in statuses), None) or {}
            reason = waiting.get("reason", "ContainerCreating")
            return f'container "{container}" in pod "{name}" is waiting to start: {reason}'
        return LogSource(pp.log, lambda: pp.proc.poll() is None)

    def resolve(self, host: str) -> str:
        """A pod's DNS name as cluster DNS answers it: `<hostname>.<subdomain>.<namespace>.svc`
        (optionally `.cluster.local`) names the pod whose spec.hostname and spec.subdomain are
        those, when a headless Service named <subdomain> in that namespace selects it, and the
        pod is Ready or the Service publishes not-ready addresses. Anything else is returned as
        written and will not resolve, as in a cluster without the Service. The answer is the pod's
        IP here (given before it starts: a real resolver would be asked again until it has one)."""
        labels = host.removesuffix(".cluster.local").split(".")
        if len(labels) != 4 or labels[3] != "svc" or labels[2] != self.namespace:
            return host
        hostname, subdomain = labels[0], labels[1]
        try:
            svc = self.core.read_namespaced_service(subdomain, self.namespace).spec
        except self.k.client.ApiException:
            return host
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            spec, meta = pod["spec"], pod["metadata"]
            selected = bool(svc.selector) and all((meta.get("labels") or {}).get(k) == v
                                                  for k, v in svc.selector.items())  # fmt: skip
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in pod.get("status", {}).get("conditions") or [])  # fmt: skip
            if (spec.get("hostname"), spec.get("subdomain")) == (hostname, subdomain) and selected \
                    and svc.cluster_ip == "None" and (ready or svc.publish_not_ready_addresses):  # fmt: skip
                return self.ip_of(meta["name"])
        return host

    # ------------------------------------------------------------------ pod lifecycle

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(self.k.client.ApiException):  # a pod already gone has no status to write
            self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})

    def _signal(self, pp: PodProcess, sig: int) -> None:
        if self.runtime == "podman":
            containers.signal_container(pp.container, sig)
        else:
            signal_tree(pp.proc.pid, sig)

    def _wait(self, pod: dict[str, Any], reason: str, message: str) -> None:
        """A container the kubelet cannot start: Pending, waiting with the kubelet's reason,
        tried again a second later."""
        self._retry_at[pod["metadata"]["name"]] = time.monotonic() + 1.0
        self._report_waiting(pod, reason, message)

    def _report_waiting(self, pod: dict[str, Any], reason: str, message: str | None) -> None:
        """Pending, the container waiting for `reason` (written when it changes)."""
        c = pod["spec"]["containers"][0]
        waiting = {"reason": reason, **({"message": message} if message is not None else {})}
        now = [(cs.get("state") or {}).get("waiting") for cs in pod.get("status", {}).get("containerStatuses") or []]
        if now == [waiting]:
            return
        self._patch_status(pod["metadata"]["name"], {"phase": "Pending", "containerStatuses": [
            {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
             "started": False, "state": {"waiting": waiting}}]})  # fmt: skip

    def _cannot_pull(self, pod: dict[str, Any]) -> bool:
        """ErrImagePull on the first try, ImagePullBackOff after, for an image this node lacks."""
        image = pod["spec"]["containers"][0]["image"]
        if self.runtime == "podman":
            present = (
                subprocess.run([*containers.PODMAN, "image", "exists", image], capture_output=True).returncode == 0
            )
        else:
            present = self.images is None or image in self.images
        if present:
            return False
        name = pod["metadata"]["name"]
        tries = self._pull_tries[name] = self._pull_tries.get(name, 0) + 1
        reason = "ErrImagePull" if tries == 1 else "ImagePullBackOff"
        message = (f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": not found'
                   if tries == 1 else f'Back-off pulling image "{image}"')  # fmt: skip
        self._wait(pod, reason, message)
        return True

    def _config_error(self, pod: dict[str, Any]) -> bool:
        """CreateContainerConfigError for a Secret or ConfigMap (or key) the pod names that is
        not there, in the kubelet's words; the kubelet retries, so a later one starts the pod."""
        c = pod["spec"]["containers"][0]
        refs = [("secret", r["secretRef"]["name"], None) for r in c.get("envFrom", []) if "secretRef" in r]
        for e in c.get("env", []):
            src = e.get("valueFrom") or {}
            for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
                if key in src:
                    refs.append((kind, src[key]["name"], src[key]["key"]))
        for kind, ref, key in refs:
            try:
                data = self._secret(ref) if kind == "secret" else self._configmap(ref)
            except self.k.client.ApiException as e:
                if e.status != 404:
                    raise
                self._wait(pod, "CreateContainerConfigError", f'{kind} "{ref}" not found')
                return True
            if key is not None and key not in data:
                what = "Secret" if kind == "secret" else "ConfigMap"
                self._wait(pod, "CreateContainerConfigError",
                           f"couldn't find key {key} in {what} {self.namespace}/{ref}")  # fmt: skip
                return True
        return False

    def _start(self, pod: dict[str, Any]) -> None:
        if self._cannot_pull(pod) or self._config_error(pod):
            return None
        if self.runtime == "podman":
            return self._start_container(pod)
        name = pod["metadata"]["name"]
        ip = self.ip_of(name)
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(pod, base)

        # Mount paths at the start of a value, or after "=" or ":", in one pass.
        alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(^|[=:])({alternatives})(?=/|$|:)")

        def local(value: str) -> str:
            if not mounts:
                return value
            return pattern.sub(lambda m: m.group(1) + str(mounts[m.group(2)]), value)

        env = {k: local(v) for k, v in self._resolve_env(pod, ip).items()}
        if env.get("PRETRAIN_MASTER_ADDR"):  # node 0's DNS name, resolved as cluster DNS would
            env["PRETRAIN_MASTER_ADDR"] = self.resolve(env["PRETRAIN_MASTER_ADDR"])
        env["PRETRAIN_METRICS_HOST"] = ip
        env["TORCH_EXTENSIONS_DIR"] = str(Path(os.environ.get("TORCH_EXTENSIONS_DIR", self.root / "ext")))
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        env["HOME"] = str(mounts.get("/workspace", base))
        env["TMPDIR"] = str(mounts.get("/tmp", base))
        # The kubelet mounts a file at the container's terminationMessagePath (/dev/termination-log)
        # and reads it when the container ends; a process cannot be given /dev, so the trainer is
        # pointed at the pod's own file instead.
        env["PRETRAIN_TERMINATION_LOG"] = str(base / "termination-log")
        env.update(self.extra_env)
        c = pod["spec"]["containers"][0]
        argv = [expand(a, env) for a in [*c["command"], *c.get("args", [])]]
        argv = [
            local(a).replace(f"--master-port={RENDEZVOUS_PORT}", f"--master-port={self._rendezvous_port(pod)}")
            for a in argv
        ]
        log_path = base / "container.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
            )
        self._running(pod, PodProcess(name, proc, log_path, _now()), ip)

    def _start_container(self, pod: dict[str, Any]) -> None:
        """Run the pod as a container of its image: what a kubelet would refuse is refused (the
        pod then waits with CreateContainerConfigError), everything else is passed on as rendered."""
        name = pod["metadata"]["name"]
        ip = self.ip_of(name)
        base = self.root / name
        c = pod["spec"]["containers"][0]
        refusal = containers.admission_error(pod)
        if refusal:
            if name not in self.refused:
                self.refused.add(name)
                self._patch_status(name, {"phase": "Pending", "containerStatuses": [
                    {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                     "started": False, "state": {"waiting": {"reason": "CreateContainerConfigError",
                                                             "message": refusal}}}]})  # fmt: skip
            return None
        env = self._resolve_env(pod, ip)
        if env.get("PRETRAIN_MASTER_ADDR"):  # node 0's DNS name, resolved as cluster DNS would
            env["PRETRAIN_MASTER_ADDR"] = self.resolve(env["PRETRAIN_MASTER_ADDR"])
        env["PRETRAIN_METRICS_HOST"] = ip
        env.update(self.extra_env)
        argv = [expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]
        port = self._rendezvous_port(pod)
        argv = [a.replace(f"--master-port={RENDEZVOUS_PORT}", f"--master-port={port}") for a in argv]
        volumes = containers.volumes(pod, base, self._configmap)
        container = containers.container_name(self.node, name)
        command = containers.podman_run(pod, container, env, argv, volumes)
        log_path = base / "container.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            out.write((" ".join(command) + "\n").encode())
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True)
        self._running(pod, PodProcess(name, proc, log_path, _now(), container=container), ip)
        return None

    def _running(self, pod: dict[str, Any], pp: PodProcess, ip: str) -> None:
        name, started, c = pod["metadata"]["name"], pp.started, pod["spec"]["containers"][0]
        self.processes[name] = pp
        self._patch_status(name, {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                                   "restartCount": 0, "started": True, "state": {"running": {"startedAt": started}}}],
        })  # fmt: skip

    def _terminated(self, pod: dict[str, Any], pp: PodProcess, code: int) -> None:
        c = pod["spec"]["containers"][0]
        exit_code = code if code >= 0 else 128 - code
        term: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                "startedAt": pp.started, "finishedAt": _now()}  # fmt: skip
        written = pp.log.parent / "termination-log"
        message = written.read_text(errors="replace")[:4096].strip() if written.is_file() else ""
        if message:
            term["message"] = message
        elif exit_code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = pp.log.read_text(errors="replace").splitlines()[-80:]
            term["message"] = "\n".join(lines)[-2048:]
        ready = [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": _now()}
                 for t in ("ContainersReady", "Ready")]  # fmt: skip
        self._patch_status(pod["metadata"]["name"], {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": ready,
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False, "state": {"terminated": term}}],
        })  # fmt: skip
        pp.reported = True

    def sync(self) -> None:
        if self._dead.is_set():
            return
        with self._lock:
            pods = dict(self.pods)
        for name, pod in pods.items():
            deleting = bool(pod["metadata"].get("deletionTimestamp"))
            if not pod["spec"].get("nodeName") and not deleting:
                if self.capacity is not None and self._bound(pods) >= self.capacity:
                    self._unschedulable(name, pod)
                    continue
                pods[name] = {**pod, "spec": {**pod["spec"], "nodeName": self.node}}  # counted from now on
                with contextlib.suppress(self.k.client.ApiException):  # the scheduler's bind
                    self.core.create_namespaced_pod_binding(name, self.namespace, {
                        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}},
                        _preload_content=False)  # the reply is a Status, which the client cannot read as a Binding  # fmt: skip
                continue
            pp = self.processes.get(name)
            if pp is None and not deleting and pod["status"].get("phase") == "Pending" and name not in self.refused:
                uid = pod["metadata"]["uid"]  # a job applied again reuses the names of its pods
                if uid not in self._creating:  # a kubelet's first word on a pod it took
                    self._creating[uid] = time.monotonic() + self.create_seconds
                    self._report_waiting(pod, "ContainerCreating", None)
                elif time.monotonic() >= max(self._retry_at.get(name, 0.0), self._creating[uid]):
                    self._start(pod)
                continue
            if pp is None:
                if deleting:  # never started here (or already stopped): confirm the deletion
                    with contextlib.suppress(self.k.client.ApiException):
                        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
                continue
            code = pp.proc.poll()
            if code is not None and not pp.reported:
                self._terminated(pod, pp, code)
            if deleting:
                if code is None:
                    grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
                    if pp.term_sent is None:
                        pp.term_sent = time.monotonic()
                        self._signal(pp, signal.SIGTERM)
                    elif time.monotonic() - pp.term_sent > grace:
                        self._signal(pp, signal.SIGKILL)
                    continue
                with contextlib.suppress(self.k.client.ApiException):
                    self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        for name in [n for n in self.processes if n not in pods]:  # deleted from the API (grace 0)
            pp = self.processes[name]
            if pp.proc.poll() is None:
                self._signal(pp, signal.SIGKILL)
            else:
                del self.processes[name]

    def _bound(self, pods: dict[str, dict[str, Any]]) -> int:
        """Pods holding a place on this node: bound and not finished (a terminating one still holds it)."""
        return sum(
            1 for p in pods.values()
            if p["spec"].get("nodeName") and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
        )  # fmt: skip

    def _unschedulable(self, name: str, pod: dict[str, Any]) -> None:
        """What kube-scheduler writes on a pod it cannot place."""
        conds = pod.get("status", {}).get("conditions") or []
        if any(c.get("type") == "PodScheduled" and c.get("status") == "False" for c in conds):
            return
        with contextlib.suppress(self.k.client.ApiException):
            self._patch_status(name, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": _now(),
                "message": f"0/1 nodes are available: 1 Too many pods (capacity {self.capacity}).",
            }]})  # fmt: skip

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._signal(self.processes[name], sig)
