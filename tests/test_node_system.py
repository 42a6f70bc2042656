"""System test of a lost node (issue 29 item 3): the API emulator, the real operator process,
kubectl, the stand-in node running pods as processes, the stand-in node lifecycle controller, S3
checkpoints (as in tests/test_system.py).

After the first checkpoint the node is lost (tests/kubelet.py `die`: its processes frozen, its
heartbeat stopped): the node lifecycle controller turns its Ready condition Unknown while the
pods stay Running in the API and their processes hang. The operator ends the attempt at once
(reason NodeNotReady, a disruption: not counted), deletes the pods with grace 0 (a graceful
deletion would hang in Terminating: no kubelet confirms it) and creates the next attempt; the
node back, the job resumes from its checkpoint and succeeds."""

from __future__ import annotations

import pytest

from tests.kubeapi.harness import wait_for
from tests.nodecontroller import NodeController
from tests.test_system import (
    JOB,
    Cluster,
    cluster,  # noqa: F401  (a fixture)
    job_yaml,
    secret_yaml,
)

pytestmark = pytest.mark.slow


def test_a_lost_node_ends_the_attempt_at_once_and_the_job_resumes(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    wait = lambda pred, timeout, what: wait_for(pred, timeout, what, c.diagnostics)  # noqa: E731
    controller = NodeController(c.api.kubeconfig, grace_seconds=5).start()
    try:
        c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
        c.kubectl("apply", "-f", "-", stdin=job_yaml(c.bucket))
        wait(lambda: c.status().get("phase") == "Running", 120, "phase Running")
        wait(lambda: f"{JOB}/step-00000010/manifest.json" in c.keys(f"{JOB}/step-"), 240, "the first checkpoint")
        frozen = [c.node.processes[f"{JOB}-a1-n{rank}"].proc for rank in (0, 1)]
        c.node.die()
        wait(lambda: c.status().get("uncountedRestarts") == 1, 60, "the attempt ended for the lost node")
        status = c.status()
        assert status["restarts"] == 0 and status["phase"] in ("Restarting", "Pending"), status
        assert "(NodeNotReady): node node-0 is NotReady: Ready is Unknown" in status["message"], status["message"]
        assert [n["node"] for n in status["avoidedNodes"]] == ["node-0"]
        # forced out of the API while their processes still hang on the lost node
        wait(
            lambda: not [p for p in c.api.objects("pods") if "-a1-" in p["metadata"]["name"]],
            30,
            "a1's pods forced out",
        )
        assert all(p.poll() is None for p in frozen), "ended by the operator, not by a timeout in the trainer"
        wait(lambda: any("-a2-" in p["metadata"]["name"] for p in c.api.objects("pods")), 30, "attempt 2's pods")
        c.node.revive()
        wait(lambda: all(p.poll() is not None for p in frozen), 30, "the lost attempt's containers killed")
        wait(lambda: c.status().get("phase") == "Succeeded", 300, "Succeeded")
    finally:
        controller.stop()
    resumed = (c.root / "node" / f"{JOB}-a2-n0" / "container.log").read_text(errors="replace")
    assert "resumed from" in resumed and "(step 10)" in resumed, resumed[-2000:]
    events = c.kubectl("get", "events", "-o", "custom-columns=REASON:.reason").stdout.split()
    assert "NodeAvoided" in events and "GangRestart" in events
    assert not controller.errors and not c.node.errors, (controller.errors, c.node.errors)
