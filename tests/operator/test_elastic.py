"""Elastic jobs through the Kopf handlers over the in-memory cluster: shrink when pods cannot be
placed, grow back when standby pods run, sizes the global batch allows, the grace period."""

from __future__ import annotations

import pytest

from pretrain.api.validation import SpecError, parse_job
from pretrain.operator.children import build_pod
from pretrain.operator.elastic import fit, sizes, termination_grace_seconds
from tests.operator.harness import Harness, job_body, job_manifest


def elastic(**extra: object) -> dict[str, object]:
    """2 nodes of 1 process, global batch 32 of micro-batches 8: it trains at 1, 2 or 4 nodes."""
    return {"resources.nodes": 2, "resources.procsPerNode": 1, "checkpoint.uri": "s3://bucket/ck",
            "resources.elastic": {"minNodes": 1, "shrinkAfterSeconds": 60}, **extra}  # fmt: skip


def bind(h: Harness, name: str) -> None:
    """What the scheduler does to a pod it can place."""
    h.cluster.objects[("Pod", "default", name)]["spec"]["nodeName"] = "node-a"


def nnodes(h: Harness, name: str) -> str:
    args = h.cluster.objects[("Pod", "default", name)]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--nnodes"))


def test_shrinks_when_a_node_cannot_be_placed_then_grows_back() -> None:
    h = Harness(job_body(elastic()))
    h.reconcile()
    assert h.pod_names() == ["tiny-a1-n0", "tiny-a1-n1"] and h.status["nodes"] == 2
    bind(h, "tiny-a1-n0")
    h.cluster.set_phase("tiny-a1-n0", "Running")
    h.advance(59)
    h.reconcile()
    assert h.phase == "Pending", "not before shrinkAfterSeconds"

    h.advance(2)
    h.reconcile()
    assert h.phase == "Restarting" and h.status["nodes"] == 1
    resize = h.status["resize"]
    assert (resize["fromNodes"], resize["toNodes"], resize["reason"], resize["count"]) == (2, 1, "Shrink", 1)
    assert "1 of 2 pod(s) could not be scheduled for 60s: restarting on 1 node(s)" in h.status["message"]
    assert h.events()[-1] == "Shrink" and h.pod_names() == []
    h.cluster.settle()
    h.reconcile()  # no backoff for a planned restart
    assert h.pod_names() == ["tiny-a2-n0"] and h.status["attempt"] == 2
    assert nnodes(h, "tiny-a2-n0") == "1"
    assert h.status["restarts"] == 0 and not h.status.get("uncountedRestarts"), "a resize is not a failure"

    bind(h, "tiny-a2-n0")
    h.run_all()
    h.reconcile()
    assert h.phase == "Running"
    h.reconcile()  # below maxNodes: a standby pod waits for the missing node
    assert h.pod_names() == ["tiny-a2-n0", "tiny-a2-s1"]
    standby = h.cluster.objects[("Pod", "default", "tiny-a2-s1")]
    assert standby["metadata"]["labels"]["pretrain.io/role"] == "standby"
    assert standby["spec"]["containers"][0]["command"] == ["sleep"]
    h.reconcile()
    assert h.phase == "Running", "a standby pod still pending changes nothing"

    h.cluster.set_phase("tiny-a2-s1", "Running")  # the node is back
    h.reconcile()
    assert h.phase == "Restarting" and h.status["nodes"] == 2
    assert (h.status["resize"]["reason"], h.status["resize"]["count"]) == ("Grow", 2)
    assert h.pod_names() == [], "the gang is stopped (SIGTERM: it checkpoints) and the standby pod freed"
    h.cluster.settle()
    h.reconcile()
    assert h.pod_names() == ["tiny-a3-n0", "tiny-a3-n1"] and nnodes(h, "tiny-a3-n1") == "2"
    h.run_all()
    h.reconcile()
    h.finish_all()
    h.reconcile()
    assert h.phase == "Succeeded" and h.status["restarts"] == 0
    assert h.events() == ["Created", "Shrink", "Resized", "Running", "Grow", "Resized", "Running", "Completed"]


def test_no_shrink_below_min_nodes() -> None:
    h = Harness(job_body(elastic(**{"resources.elastic": {"minNodes": 2, "shrinkAfterSeconds": 0}})))
    h.reconcile()
    bind(h, "tiny-a1-n0")
    h.advance(600)
    h.reconcile()
    assert h.phase == "Pending" and h.status["nodes"] == 2 and h.pod_names() == ["tiny-a1-n0", "tiny-a1-n1"]


def test_sizes_follow_the_global_batch() -> None:
    job = parse_job(job_manifest("t", elastic(**{"resources.nodes": 4, "resources.elastic": {"minNodes": 1}})))
    assert sizes(job.spec) == [1, 2, 4], "32 = 8 x n x accumulation: not at 3"
    assert fit(job.spec, 3) == 2 and fit(job.spec, 4) == 4 and fit(job.spec, 0) is None


@pytest.mark.parametrize(
    ("elastic_spec", "field", "reason"),
    [
        ({"minNodes": 3}, "spec.resources.elastic.minNodes", "above resources.nodes"),
        ({"minNodes": 1, "maxNodes": 3}, "spec.resources.elastic.maxNodes", "not divisible by microBatchSize x 3"),
    ],
)
def test_elastic_bounds_are_checked(elastic_spec: dict[str, int], field: str, reason: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_job(job_manifest("t", elastic(**{"resources.elastic": elastic_spec})))
    assert field in str(e.value) and reason in str(e.value)


def test_grace_period_fits_a_checkpoint() -> None:
    small = parse_job(job_manifest("t", elastic()))
    seven_b = {"model.layers": 32, "model.heads": 32, "model.hidden": 4096, "model.intermediate": 11008}
    big = parse_job(job_manifest("t", elastic(**seven_b)))
    assert termination_grace_seconds(small.spec) == 120
    assert 200 < termination_grace_seconds(big.spec) < 3600, "7B: 47 GB per node of 2 at 100 MiB/s"
    mine = parse_job(job_manifest("t", elastic(**{"resources.terminationGracePeriodSeconds": 900})))
    assert termination_grace_seconds(mine.spec) == 900
    pod = build_pod(mine, "default", "uid", 1, 0)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert pod["spec"]["terminationGracePeriodSeconds"] == 900
    # SIGTERM reaches torchrun alone (PID 1), which would SIGKILL its workers after 30 s.
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "895" and env["PRETRAIN_TERMINATION_GRACE_SECONDS"] == "900"
