"""System test of a hung rank (issue 29 items 2 and 3): the API emulator, the real operator
process, kubectl, the stand-in node running pods as processes, S3 checkpoints (as in
tests/test_system.py).

Rank 1 of a 2-node job is SIGSTOPped after the first checkpoint: rank 0 waits in a collective
until its watchdog fires, leaving `Stalled: ...` and its stacks as its pod's termination message;
the operator restarts the gang (reason Stalled, counted), the next attempt's pods prefer other
nodes than the one that failed, and the job resumes from its checkpoint and succeeds."""

from __future__ import annotations

import signal

import psutil
import pytest
import yaml

from pretrain.timestamps import parse_time
from tests.kubeapi.harness import wait_for
from tests.test_system import (
    JOB,
    Cluster,
    cluster,  # noqa: F401  (a fixture)
    job_yaml,
    secret_yaml,
)
from tests.test_watchdog import children_named

pytestmark = pytest.mark.slow

STALL_SECONDS = 30


def stalling_job_yaml(bucket: str) -> str:
    doc = yaml.safe_load(job_yaml(bucket))
    doc["spec"]["training"]["maxSteps"] = 30
    doc["spec"]["runPolicy"]["stallTimeoutSeconds"] = STALL_SECONDS
    return yaml.safe_dump(doc, sort_keys=False)


def trainer_of(c: Cluster, pod: str) -> psutil.Process:
    """The trainer worker under a pod's torchrun (one process per node here)."""
    workers = children_named(psutil.Process(c.node.processes[pod].proc.pid), "pretrain.trainer")
    assert len(workers) == 1, [p.cmdline() for p in workers]
    return workers[0]


def test_a_stopped_rank_is_found_restarted_away_from_its_node_and_the_job_succeeds(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    wait = lambda pred, timeout, what: wait_for(pred, timeout, what, c.diagnostics)  # noqa: E731
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    c.kubectl("apply", "-f", "-", stdin=stalling_job_yaml(c.bucket))
    wait(lambda: c.status().get("phase") == "Running", 120, "phase Running")
    wait(lambda: f"{JOB}/step-00000010/manifest.json" in c.keys(f"{JOB}/step-"), 240, "the first checkpoint")
    # stopped past the checkpoint, once the operator saw it: the steps since are trained twice
    wait(lambda: (c.status().get("progress") or {}).get("step", 0) >= 12, 120, "step 12 scraped")
    stopped = trainer_of(c, f"{JOB}-a1-n1")
    stopped.send_signal(signal.SIGSTOP)
    try:
        wait(lambda: c.status().get("restarts") == 1, STALL_SECONDS + 120, "the stalled gang restarted")
    finally:
        if stopped.is_running():
            stopped.send_signal(signal.SIGCONT)
    status = c.status()
    assert f"pod {JOB}-a1-n0 stalled" in status["message"] and "Stalled: no progress on rank 0" in status["message"]
    # what the kubelet reported as the pod's termination message (the pod itself may be gone by
    # now: the restart deletes it, and a terminated pod's deletion is confirmed at once)
    message = (c.root / "node" / f"{JOB}-a1-n0" / "termination-log").read_text(errors="replace")[:4096]
    assert message.startswith("Stalled: no progress on rank 0 for 3"), message[:300]
    assert f"(limit {STALL_SECONDS}s" in message and "most recent call first" in message, message[:1500]
    assert [n["node"] for n in status["avoidedNodes"]] == [c.node.node]
    wait(lambda: any(p["metadata"]["name"] == f"{JOB}-a2-n0" for p in c.api.objects("pods")), 60, "attempt 2")
    pod = next(p for p in c.api.objects("pods") if p["metadata"]["name"] == f"{JOB}-a2-n0")
    preferred = pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchFields"] == [{"key": "metadata.name", "operator": "NotIn",
                                                          "values": [c.node.node]}]  # fmt: skip
    wait(lambda: c.status().get("phase") == "Succeeded", 300, "Succeeded")
    resumed = (c.root / "node" / f"{JOB}-a2-n0" / "container.log").read_text(errors="replace")
    assert "resumed from" in resumed and "(step 10)" in resumed, resumed[-2000:]
    events = c.kubectl("get", "events", "-o", "custom-columns=REASON:.reason").stdout.split()
    assert "NodeAvoided" in events and "GangRestart" in events
    # goodput: the parts add up to the wall time (status times are whole seconds: 2 s of slack)
    status = c.status()
    parts = status["goodput"]["seconds"]
    wall = (parse_time(status["completionTime"]) - parse_time(status["startTime"])).total_seconds()  # type: ignore[operator]
    assert abs(parts["total"] - wall) <= max(0.01 * wall, 2.0), (parts, wall)
    assert parts["restart"] > 0 and parts["recomputed"] > 0 and parts["restarting"] > 0, parts
    assert 0 < parts["ratio"] < 1 and parts["training"] > 0, parts
