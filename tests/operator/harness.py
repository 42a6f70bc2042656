"""Drive the Kopf handlers as Kopf would, over an in-memory cluster and a controllable clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import yaml

from pretrain.operator.progress import progress_job
from pretrain.operator.reconcile import reconcile_job
from tests.conftest import ROOT
from tests.kubeapi.patches import merge_patch
from tests.operator.memory_cluster import InMemoryCluster


def job_manifest(name: str = "tiny", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """examples/tiny-cpu.yaml named `name`, with spec overrides by dotted path ("training.maxSteps")."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": name}
    for path, value in (overrides or {}).items():
        node = doc["spec"]
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


def job_body(overrides: dict[str, Any] | None = None, name: str = "tiny") -> dict[str, Any]:
    """The job as Kopf hands it to a handler (namespace, uid and generation set)."""
    doc = job_manifest(name, overrides)
    doc["metadata"].update({"namespace": "default", "uid": f"uid-{name}", "generation": 1})
    return doc


def apply_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply a status patch as the API server applies Kopf's JSON merge patch (RFC 7386)."""
    merged = merge_patch(target, patch)
    target.clear()
    target.update(merged)


class Harness:
    def __init__(self, body: dict[str, Any]) -> None:
        self.cluster = InMemoryCluster()
        self.body = self.cluster.add_job(body)  # the reconciles read it (and write its status) there

    @property
    def status(self) -> dict[str, Any]:
        return self.body.setdefault("status", {})

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    def reconcile(self) -> None:
        reconcile_job("default", self.body["metadata"]["name"], self.cluster, self.cluster.now)

    def progress(self) -> None:
        progress_job("default", self.body["metadata"]["name"], self.cluster, self.cluster.now)

    def advance(self, seconds: float) -> None:
        self.cluster.now += timedelta(seconds=seconds)

    def pod_names(self) -> list[str]:
        return [p["metadata"]["name"] for p in self.cluster.pods() if not p["metadata"].get("deletionTimestamp")]

    def run_all(self) -> None:
        for name in self.pod_names():
            self.cluster.set_phase(name, "Running")

    def finish_all(self, exit_code: int = 0) -> None:
        for name in self.pod_names():
            self.cluster.set_phase(name, "Succeeded" if exit_code == 0 else "Failed", exit_code)

    def events(self) -> list[str]:
        return [e.reason for _, e in self.cluster.events]

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == type_), None)
