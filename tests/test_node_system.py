"""System test of a lost node (issue 29 item 3): the API emulator, the real operator process,
kubectl, the stand-in node running pods as processes, the stand-in node lifecycle controller, S3
checkpoints (as in tests/test_system.py).

After the first checkpoint the node is lost (tests/kubelet.py `die`: its processes frozen, its
heartbeat stopped): the node lifecycle controller turns its Ready condition Unknown while the
pods stay Running in the API and their processes hang. The operator ends the attempt at once
(reason NodeNotReady, a disruption: not counted), deletes the pods with grace 0 (a graceful
deletion would hang in Terminating: no kubelet confirms it) and creates the next attempt; the
node back, the job resumes from its checkpoint and succeeds.

The job is driven as a user of `pretrain.client` would (issue 31): `pretrain submit` creates it,
`watch` sees it run with progress, `logs -f` follows rank 0 of the second attempt until its pod
ends, `wait` returns its success."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pretrain.cli import main
from pretrain.client import PretrainClient
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
        (c.root / "job.yaml").write_text(job_yaml(c.bucket))
        env = {"KUBECONFIG": str(c.api.kubeconfig)}
        submitted = CliRunner().invoke(main, ["submit", str(c.root / "job.yaml")], env=env)
        assert submitted.output == f"pretrainjob.pretrain.io/{JOB} created\n", submitted.output
        client = PretrainClient(kubeconfig=str(c.api.kubeconfig))
        seen = next(s for s in client.watch(JOB, timeout=180) if (s.get("progress") or {}).get("step"))
        assert seen["phase"] == "Running" and seen["progress"]["totalSteps"] == 40, seen
        wait(lambda: f"{JOB}/step-00000010/manifest.json" in c.keys(f"{JOB}/step-"), 240, "the first checkpoint")
        frozen = [c.node.processes[f"{JOB}-a1-n{rank}"].proc for rank in (0, 1)]
        c.node.die()
        wait(lambda: c.status().get("uncountedRestarts") == 1, 60, "the attempt ended for the lost node")
        status = c.status()
        assert status["restarts"] == 0, status
        # the status message moves on at once (an uncounted restart has no backoff): the event stays
        restarts = lambda: [e["message"] for e in c.api.objects("events") if e.get("reason") == "GangRestart"]  # noqa: E731
        wait(restarts, 30, "the GangRestart event")
        restarted = restarts()
        assert len(restarted) == 1 and "(NodeNotReady): node node-0 is NotReady: Ready is Unknown" in restarted[0], (
            restarted
        )
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
        wait(lambda: c.status().get("phase") == "Running" and c.status().get("attempt") == 2, 120, "attempt 2 runs")
        followed = CliRunner().invoke(main, ["logs", JOB, "-f"], env=env)  # until rank 0's pod ends
        assert followed.exit_code == 0 and "[rank 0]" in followed.output, followed.output[-2000:]
        assert "resumed from" in followed.output and "(step 10)" in followed.output, followed.output[-2000:]
        assert client.wait(JOB, timeout=120)["phase"] == "Succeeded"
    finally:
        controller.stop()
    # the report drawn from the job's history in its bucket, found through the API
    drawn = CliRunner().invoke(
        main, ["report", "--job", JOB, "--output", str(c.root / "report")], env={**env, **c.s3.env}
    )
    assert drawn.exit_code == 0, drawn.output
    curves = json.loads((c.root / "report" / "curves.json").read_text())
    trained = max(x for line in curves["loss"].values() for x in line["x"])
    assert trained == 40, curves["loss"].keys()
    events = c.kubectl("get", "events", "-o", "custom-columns=REASON:.reason").stdout.split()
    assert "NodeAvoided" in events and "GangRestart" in events
    assert not controller.errors and not c.node.errors, (controller.errors, c.node.errors)
