"""Pods as real containers: a rendered pod spec becomes a `podman run` (the stand-in kubelet's
container mode, tests/kubelet.py), with the kubelet's own checks before it.

Passed on as rendered: the image (never pulled: `--pull never`, as with a node's local image),
command and args (command replaces the image's entrypoint, args its command), env, the user and
groups of the securityContext (runAsUser, runAsGroup, fsGroup as a supplementary group),
readOnlyRootFilesystem, capabilities, allowPrivilegeEscalation (no-new-privileges), the memory
limit, the emptyDir and ConfigMap volumes at their mount paths (read-only where the mount says
so), /dev/shm's size, and the termination-message file at terminationMessagePath.

What a node would do differently: the network is the host's (so that pod IPs are loopback
addresses, as in process mode), and emptyDir folders live under the test's folder.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

PODMAN = ["podman", "--runtime", "runc"]

#: A mount is (host path, container path, read-only).
Mount = tuple[Path, str, bool]


def available() -> str | None:
    """None when podman can run containers here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    try:
        done = subprocess.run([*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"podman info failed: {e}"
    return None if done.returncode == 0 else f"podman info failed: {done.stderr.strip()[:300]}"


def container_name(node: str, pod: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"k8s-{node}-{pod}")


@functools.cache
def image_user(image: str) -> str:
    """The image's USER ("" is root)."""
    done = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Config.User}}", image], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else ""


def _security(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    c = pod["spec"]["containers"][0]
    return pod["spec"].get("securityContext") or {}, c.get("securityContext") or {}


def effective_user(pod: dict[str, Any]) -> tuple[int | None, int | None]:
    """(uid, gid) the container runs as: the container's securityContext over the pod's, then
    the image's USER when numeric (None: a name, which the kubelet cannot check)."""
    psc, csc = _security(pod)
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is None:
        user = image_user(pod["spec"]["containers"][0]["image"]).split(":")[0] or "0"
        uid = int(user) if user.isdigit() else None
    return uid, gid


def admission_error(pod: dict[str, Any]) -> str | None:
    """What the kubelet refuses before creating the container (the pod waits with
    CreateContainerConfigError), in the kubelet's words."""
    psc, csc = _security(pod)
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        uid, _ = effective_user(pod)
        name = pod["spec"]["containers"][0]["name"]
        if uid == 0:
            return (f'container\'s runAsUser breaks non-root policy (pod: "{pod["metadata"]["name"]}'
                    f'_{pod["metadata"]["namespace"]}", container: {name})')  # fmt: skip
        if uid is None:
            return "container has runAsNonRoot and image has non-numeric user, cannot verify user is non-root"
    return None


def volumes(pod: dict[str, Any], base: Path, configmap: Callable[[str], dict[str, str]]) -> list[Mount]:
    """Host folders for the pod's volumes (emptyDir world-writable as the kubelet makes it,
    ConfigMap keys as files) and where they are mounted; /dev/shm is `--shm-size` instead."""
    spec = pod["spec"]
    by_name = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: list[Mount] = []
    for m in spec["containers"][0].get("volumeMounts", []):
        v = by_name[m["name"]]
        if m["mountPath"] == "/dev/shm" and (v.get("emptyDir") or {}).get("medium") == "Memory":
            continue
        host = base / "volumes" / m["name"]
        host.mkdir(parents=True, exist_ok=True)
        if "configMap" in v:
            for key, text in configmap(v["configMap"]["name"]).items():
                (host / key).write_text(text)
                (host / key).chmod(0o644)
            host.chmod(0o755)
        elif "emptyDir" in v:
            host.chmod(0o777)
        else:
            raise ValueError(f"volume {m['name']}: only emptyDir and configMap run here")
        mounts.append((host, m["mountPath"], bool(m.get("readOnly"))))
    # The kubelet's termination-message file, written by the container, read when it ends.
    log = base / "termination-log"
    log.touch()
    log.chmod(0o666)
    path = spec["containers"][0].get("terminationMessagePath", "/dev/termination-log")
    mounts.append((log, path, False))
    return mounts


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1000, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(float(quantity))


def podman_run(pod: dict[str, Any], name: str, env: dict[str, str], argv: list[str], mounts: list[Mount]) -> list[str]:
    """The `podman run` of the pod's one container, attached (its exit code is the container's)."""
    spec = pod["spec"]
    c = spec["containers"][0]
    psc, csc = _security(pod)
    uid, gid = effective_user(pod)
    cmd = [*PODMAN, "run", "--rm", "--name", name, "--pull", "never", "--network", "host", "--hostname",
           spec.get("hostname", pod["metadata"]["name"])]  # fmt: skip
    if uid is not None:
        cmd += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if psc.get("fsGroup") is not None:
        cmd += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        cmd += ["--read-only", "--read-only-tmpfs=false"]  # no writable /tmp or /run that Kubernetes would not give
    caps = csc.get("capabilities") or {}
    cmd += [f"--cap-drop={cap}" for cap in caps.get("drop", [])]
    cmd += [f"--cap-add={cap}" for cap in caps.get("add", [])]
    if csc.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt", "no-new-privileges"]
    limits = (c.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        cmd += ["--memory", str(_bytes(str(limits["memory"])))]
    shm = next((v for v in spec.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"), None)
    if shm and shm["emptyDir"].get("sizeLimit"):
        cmd += ["--shm-size", str(_bytes(str(shm["emptyDir"]["sizeLimit"])))]
    for host, path, read_only in mounts:
        cmd += ["-v", f"{host}:{path}{':ro' if read_only else ''}"]
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    if c.get("workingDir"):
        cmd += ["--workdir", c["workingDir"]]
    command = c.get("command")
    if command:
        cmd += ["--entrypoint", argv[0], c["image"], *argv[1:]]
    else:
        cmd += [c["image"], *argv]
    return cmd


def signal_container(name: str, sig: int) -> None:
    subprocess.run([*PODMAN, "kill", "--signal", str(int(sig)), name], capture_output=True, timeout=60)
