"""Property tests of the pure planner: whatever happens to the pods, the plan stays sane."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.operator.children import LABEL_ATTEMPT
from pretrain.operator.planner import plan
from pretrain.operator.reconcile import job_from, reconcile_job
from tests.operator.harness import Harness, job_body

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

actions = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.integers(0, 3)),
        st.tuples(st.just("fail"), st.integers(0, 3)),
        st.tuples(st.just("succeed"), st.integers(0, 3)),
        st.tuples(st.just("vanish"), st.integers(0, 3)),
        st.tuples(st.just("settle"), st.just(0)),
        st.tuples(st.just("wait"), st.integers(1, 400)),
        st.tuples(st.just("suspend"), st.booleans()),
    ),
    max_size=40,
)


def replan_is_empty(h: Harness) -> None:
    """Planning again right after applying a plan asks for nothing more (idempotence)."""
    meta = h.body["metadata"]
    job, invalid = job_from(h.body)
    again = plan(job, name=meta["name"], namespace="default", uid=meta["uid"], generation=1, status=h.status,
                 observed=h.cluster.observe("default", meta["name"]), now=h.cluster.now, invalid=invalid)  # fmt: skip
    assert again.create == [] and again.delete == [] and again.replace == [], (again.create, again.delete)
    assert again.status == h.status


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.integers(1, 4), max_restarts=st.integers(0, 3), steps=actions)
def test_planner_invariants(nodes: int, max_restarts: int, steps: list[tuple[str, object]]) -> None:
    h = Harness(job_body({
        "resources.nodes": nodes, "resources.procsPerNode": 1, "checkpoint.uri": "s3://b/c",
        "training.globalBatchSize": 8 * nodes, "runPolicy.maxRestarts": max_restarts,
        "runPolicy.restartBackoffSeconds": 30, "runPolicy.maxRestartBackoffSeconds": 120,
    }))  # fmt: skip
    seen_names: set[str] = set()
    for kind, arg in steps:
        live = h.pod_names()
        if kind in ("run", "fail", "succeed", "vanish") and live:
            name = live[int(arg) % len(live)]  # type: ignore[call-overload]
            if kind == "vanish":
                h.cluster.remove(name)
            else:
                phase = {"run": "Running", "fail": "Failed", "succeed": "Succeeded"}[kind]
                h.cluster.set_phase(name, phase, exit_code=None if kind == "run" else (1 if kind == "fail" else 0))
        elif kind == "settle":
            h.cluster.settle()
        elif kind == "wait":
            h.advance(int(arg))  # type: ignore[call-overload]
        elif kind == "suspend":
            h.body["spec"].setdefault("runPolicy", {})["suspend"] = bool(arg)
        h.reconcile()
        replan_is_empty(h)
        live_pods = [p for p in h.cluster.pods() if not p["metadata"].get("deletionTimestamp")]
        attempts = {p["metadata"]["labels"][LABEL_ATTEMPT] for p in live_pods}
        assert len(live_pods) <= nodes, "never more than `nodes` live pods"
        assert len(attempts) <= 1, "never two attempts alive at once"
        for p in h.cluster.pods():
            assert DNS_LABEL.match(p["metadata"]["name"]) and len(p["metadata"]["name"]) <= 63
        created = {p["metadata"]["name"] for p in h.cluster.pods()}
        assert h.status.get("restarts", 0) <= max_restarts
        seen_names |= created
    assert all(n.startswith("tiny-a") for n in seen_names)


def test_reconcile_body_is_deterministic() -> None:
    a, b = Harness(job_body()), Harness(job_body())
    pa = reconcile_job("default", a.body["metadata"]["name"], a.cluster, a.cluster.now)
    pb = reconcile_job("default", b.body["metadata"]["name"], b.cluster, b.cluster.now)
    assert pa.create == pb.create and pa.status == pb.status
