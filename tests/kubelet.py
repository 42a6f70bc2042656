"""A stand-in kubelet for the in-memory cluster: runs the operator's pods as local processes.

For every Pod the operator creates it starts the container's command and args (with Kubernetes'
`$(VAR)` expansion) as a process tree, with the pod's env (values, the downward-API fields and
ConfigMap/Secret references the operator uses, `envFrom` Secrets), its ConfigMap volumes written
to a folder, and reports the phase back: Running when started, Succeeded or Failed with the exit
code when it ends. Deleting a pod sends SIGTERM to its processes, SIGKILL after the grace
period, and then removes it.

What it substitutes, as a real node would differ from this machine: mount paths (to folders of
its own), each pod's IP (127.0.0.<n>, so that node 0's DNS name resolves to it), the rendezvous
port (a free one), the compiled-extension cache (shared, like an image layer), and PATH (this
virtual environment). Never the command, the args' meaning, or the trainer config.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.operator.cluster import InMemoryCluster
from pretrain.trainer.command import RENDEZVOUS_PORT

VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (unknown references stay as written)."""
    return VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants, as a container runtime signals a container
    (torchrun starts its workers in sessions of their own, so a process group is not enough)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


@dataclass
class PodProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    deleting_since: float | None = None


@dataclass
class LocalKubelet:
    cluster: InMemoryCluster
    root: Path
    namespace: str = "default"
    grace_seconds: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, PodProcess] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    _next_ip: int = 10
    _port: int | None = None

    def _rendezvous_port(self) -> int:
        if self._port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._port = int(s.getsockname()[1])
        return self._port

    # ------------------------------------------------------------------ env and volumes

    def _resolve_env(self, pod: dict[str, Any], ip: str) -> dict[str, str]:
        c = pod["spec"]["containers"][0]
        meta = pod["metadata"]
        env: dict[str, str] = {}
        for ref in c.get("envFrom", []):
            secret = self.cluster.objects[("Secret", self.namespace, ref["secretRef"]["name"])]
            env.update(secret["stringData"])
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                                  "status.podIP": ip}[path]  # fmt: skip
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                env[e["name"]] = self.cluster.objects[("ConfigMap", self.namespace, ref["name"])]["data"][ref["key"]]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                env[e["name"]] = self.cluster.objects[("Secret", self.namespace, ref["name"])]["stringData"][ref["key"]]
        return env

    def _mounts(self, pod: dict[str, Any], base: Path) -> dict[str, Path]:
        """mountPath -> local folder, with ConfigMap volumes written out."""
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        out: dict[str, Path] = {}
        for m in pod["spec"]["containers"][0]["volumeMounts"]:
            if m["mountPath"] == "/dev/shm":
                continue  # this machine's /dev/shm serves
            local = base / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            v = volumes[m["name"]]
            if "configMap" in v:
                data = self.cluster.objects[("ConfigMap", self.namespace, v["configMap"]["name"])]["data"]
                for key, text in data.items():
                    (local / key).write_text(text)
            out[m["mountPath"]] = local
        return out

    # ------------------------------------------------------------------ the sync loop

    def ip_of(self, pod_name: str) -> str:
        if pod_name not in self.ips:
            self.ips[pod_name] = f"127.0.0.{self._next_ip}"
            self._next_ip += 1
        return self.ips[pod_name]

    def _start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        ip = self.ip_of(name)
        base = self.root / name
        mounts = self._mounts(pod, base)

        # Mount paths at the start of a value, or after "=" or ":", in one pass.
        alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(^|[=:])({alternatives})(?=/|$|:)")

        def local(value: str) -> str:
            return pattern.sub(lambda m: m.group(1) + str(mounts[m.group(2)]), value)

        env = {k: local(v) for k, v in self._resolve_env(pod, ip).items()}
        if env.get("PRETRAIN_MASTER_ADDR"):  # node 0's DNS name resolves to node 0's pod IP
            env["PRETRAIN_MASTER_ADDR"] = self.ip_of(env["PRETRAIN_MASTER_ADDR"].split(".", 1)[0])
        env["PRETRAIN_METRICS_HOST"] = ip
        env["TORCH_EXTENSIONS_DIR"] = str(Path(os.environ.get("TORCH_EXTENSIONS_DIR", self.root / "ext")))
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        env["HOME"] = str(mounts.get("/workspace", base))
        env["TMPDIR"] = str(mounts.get("/tmp", base))
        env.update(self.extra_env)
        c = pod["spec"]["containers"][0]
        argv = [expand(a, env) for a in [*c["command"], *c.get("args", [])]]
        argv = [
            local(a).replace(f"--master-port={RENDEZVOUS_PORT}", f"--master-port={self._rendezvous_port()}")
            for a in argv
        ]
        log = base / "container.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
            )
        self.processes[name] = PodProcess(name, proc, log)
        obj = self.cluster.objects[("Pod", self.namespace, name)]
        obj["status"] = {"phase": "Running", "podIP": ip}

    def sync(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.cluster.pods(self.namespace)}
        for name, pod in pods.items():
            if name not in self.processes and not pod["metadata"].get("deletionTimestamp"):
                self._start(pod)
        for name, pp in list(self.processes.items()):
            pod = pods.get(name)
            code = pp.proc.poll()
            if pod is not None and pod["metadata"].get("deletionTimestamp"):
                if code is None:
                    if pp.deleting_since is None:
                        pp.deleting_since = time.monotonic()
                        signal_tree(pp.proc.pid, signal.SIGTERM)
                    elif time.monotonic() - pp.deleting_since > self.grace_seconds:
                        signal_tree(pp.proc.pid, signal.SIGKILL)
                    continue
                del self.cluster.objects[("Pod", self.namespace, name)]
                del self.processes[name]
                continue
            if code is not None and pod is not None and pod["status"].get("phase") == "Running":
                exit_code = code if code >= 0 else 128 - code
                lines = [ln for ln in pp.log.read_text(errors="replace").splitlines() if ln.strip()]
                self.cluster.set_phase(name, "Succeeded" if code == 0 else "Failed", exit_code,
                                       message=lines[-1] if lines else "", namespace=self.namespace)  # fmt: skip

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        signal_tree(self.processes[name].proc.pid, sig)

    def stop(self) -> None:
        for pp in self.processes.values():
            signal_tree(pp.proc.pid, signal.SIGKILL)
            pp.proc.wait()


class Loop:
    """Operator and kubelet together, in a background thread, every `period` seconds."""

    def __init__(self, step: Any, period: float = 0.5) -> None:
        self.step, self.period = step, period
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except BaseException as e:  # surfaced by the test
                self.error = e
                return
            time.sleep(self.period)

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=30)
