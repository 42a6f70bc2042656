"""Helpers around the emulator for tests: kubectl runs, the real operator process."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.kubeapi.rbac import service_account_user
from tests.kubeapi.server import ApiServer

KUBECTL = ROOT / ".cache" / "k8s-bin" / "kubectl"
HELM = ROOT / ".cache" / "k8s-bin" / "helm"
CHART = ROOT / "charts" / "pretrain-operator"


@functools.cache
def chart_rbac(namespace: str, watch: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    """The operator's service-account user and the RBAC objects `helm template` renders for a
    release in `namespace` watching `watch` (empty: every namespace)."""
    values = ["--set", "watchNamespaces={" + ",".join(watch) + "}"] if watch else []
    out = subprocess.run([str(HELM), "template", "ptr", str(CHART), "--namespace", namespace, *values],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    kinds = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
    return service_account_user(sa.get("namespace", namespace), sa["name"]), [d for d in docs if d["kind"] in kinds]


def start_apiserver(workdir: Path, crds: bool = True) -> ApiServer:
    workdir.mkdir(parents=True, exist_ok=True)
    api = ApiServer(workdir).start()
    if crds:
        api.install_crd(ROOT / "crds" / "pretrainjob.yaml")
    return api


@dataclass
class Kubectl:
    """The real kubectl v1.35 (from `make tools`) with the emulator's kubeconfig."""

    api: ApiServer
    history: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.api.kubeconfig)}
        cmd = [str(KUBECTL), "--cache-dir", str(self.api.workdir / "kubectl-cache"), *args]
        p = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
        self.history.append(f"$ kubectl {' '.join(args)}\n{p.stdout}{p.stderr}")
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p


@dataclass
class OperatorProcess:
    """`pretrain operator` (the chart's command) in a process of its own, against the emulator."""

    api: ApiServer
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    #: The namespaces the chart is installed to watch (its RBAC, enforced by the emulator, is the
    #: operator's identity); the operator is started with --namespace for each.
    watch: tuple[str, ...] = ("default",)
    #: RBAC objects to use instead of the chart's (a test that takes a rule away).
    rbac: list[dict[str, Any]] | None = None

    def start(self) -> OperatorProcess:
        user, rbac = chart_rbac("default", self.watch)
        rbac = self.rbac if self.rbac is not None else rbac
        kubeconfig = self.api.kubeconfig_for(user, rbac, self.log.with_suffix(".kubeconfig"))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        from tests.trainer_runs import free_port

        self.metrics_port = free_port()
        namespaces = [a for ns in self.watch for a in ("--namespace", ns)] or ["--all-namespaces"]
        cmd = [sys.executable, "-m", "pretrain.cli", "operator", *namespaces,
               "--health-port", str(free_port()), "--metrics-port", str(self.metrics_port), *self.args]  # fmt: skip
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(predicate: Any, timeout: float, what: str, diagnostics: Any = None, period: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    extra = diagnostics() if diagnostics else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{extra}")
