"""System test of an elastic job: the API emulator, the real operator process, kubectl, the
stand-in node running pods as processes, S3 checkpoints (as in tests/test_system.py).

A 2-node job with minNodes 1 loses a node that cannot come back (the node refuses the pod),
goes on with 1 node from its checkpoint, grows back to 2 when the node takes pods again, and
succeeds; status, kubectl and events tell the story."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.kubeapi.harness import wait_for
from tests.test_system import (
    JOB,
    Cluster,
    cluster,  # noqa: F401  (a fixture)
    job_yaml,
    secret_yaml,
)

pytestmark = pytest.mark.slow

STEPS = 60


def elastic_job_yaml(bucket: str) -> str:
    doc = yaml.safe_load(job_yaml(bucket))
    doc["spec"]["training"]["maxSteps"] = STEPS
    doc["spec"]["resources"]["elastic"] = {"minNodes": 1, "shrinkAfterSeconds": 5}
    return yaml.safe_dump(doc, sort_keys=False)


def logs_of(c: Cluster, pod: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (c.root / "node").glob(f"{pod}/container.log"))


def test_elastic_job_shrinks_when_a_node_is_lost_and_grows_back(cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    wait = lambda pred, timeout, what: wait_for(pred, timeout, what, c.diagnostics)  # noqa: E731
    c.kubectl("apply", "-f", "-", stdin=secret_yaml(c.s3))
    c.kubectl("apply", "-f", "-", stdin=elastic_job_yaml(c.bucket))
    wait(lambda: c.status().get("phase") == "Running", 120, "phase Running")
    assert c.table()["NODES"] == "2"
    wait(lambda: f"{JOB}/step-00000010/manifest.json" in c.keys(f"{JOB}/step-"), 240, "the first checkpoint")

    # A node is lost for good: its pod dies and the node takes no new one.
    c.node.capacity = 1
    c.node.kill(f"{JOB}-a1-n1")
    wait(lambda: c.status().get("nodes") == 1 and c.status().get("phase") == "Running", 180, "running on 1 node")
    status = c.status()
    assert (status["resize"]["fromNodes"], status["resize"]["toNodes"], status["resize"]["reason"]) == (2, 1, "Shrink")
    assert "could not be scheduled for 5s" in status["resize"]["message"]
    assert status["restarts"] == 1, "the pod that died counts; the resize does not"
    shrunk = status["attempt"]
    assert c.table()["NODES"] == "1"
    wait(lambda: "resumed from" in logs_of(c, f"{JOB}-a{shrunk}-n0"), 120, "the 1-node attempt resumed")
    log = logs_of(c, f"{JOB}-a{shrunk}-n0")
    assert "(2 processes, ZeRO-2) to the universal format for 1 processes" in log, log[-3000:]

    # The node comes back: the standby pod runs, and the job grows back to 2 nodes.
    step_before = c.status().get("progress", {}).get("step") or 0
    assert step_before < STEPS, "the job must still be running to grow"
    c.node.capacity = None
    wait(lambda: c.status().get("nodes") == 2 and c.status().get("phase") == "Running", 180, "running on 2 nodes")
    status = c.status()
    assert (status["resize"]["reason"], status["resize"]["count"]) == ("Grow", 2)
    grown = status["attempt"]
    stop_log = logs_of(c, f"{JOB}-a{shrunk}-n0")
    assert "saving a checkpoint at the end of this step" in stop_log, stop_log[-3000:]
    # The pod's SIGTERM reached torchrun alone (PID 1, as a kubelet sends it): the save landed,
    # what the log says is what the bucket holds, and the grown attempt resumed from it.
    saved = re.search(r"stopped at step (\d+) on request; checkpoint (step-\d{8}) saved ([\d.]+)s after the signal",
                      stop_log)  # fmt: skip
    assert saved and float(saved.group(3)) < 120, stop_log[-3000:]
    assert f"{JOB}/{saved.group(2)}/manifest.json" in c.keys(f"{JOB}/{saved.group(2)}/")

    wait(lambda: c.status().get("phase") == "Succeeded", 300, "Succeeded")
    status = c.status()
    assert (status["progress"]["step"], status["nodes"], status["restarts"]) == (STEPS, 2, 1)
    log = logs_of(c, f"{JOB}-a{grown}-n0")
    assert "to the universal format for 2 processes" in log, log[-3000:]
    assert f"resumed from s3://{c.bucket}/{JOB}/{saved.group(2)} (step {saved.group(1)})" in log, log[-3000:]
    events = json.loads(c.kubectl("get", "events", "-o", "json").stdout)["items"]
    reasons = [e["reason"] for e in events if e["involvedObject"].get("name") == JOB]
    assert "Shrink" in reasons and "Grow" in reasons, reasons
    assert not [p for p in c.api.objects("pods") if "-s" in p["metadata"]["name"].rsplit("-", 1)[-1]], "no standby left"
