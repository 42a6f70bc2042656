"""Indexed Jobs in the emulator (issue 28 item 4): the API server's Job admission (tests/kubeapi/
batch.py) and the stand-in Job controller (tests/jobcontroller.py) running pods on the stand-in
node, as strict as the real ones where the preparation stage will rely on them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.jobcontroller import JobController, intervals, parse_intervals
from tests.kubeapi.harness import wait_for
from tests.kubeapi.server import ApiServer
from tests.kubeapi.store import ApiError
from tests.kubelet import Kubelet


def job(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
        "completionMode": "Indexed", "completions": 3, "parallelism": 3, **spec,
        "template": {"metadata": {"labels": {"app": "prep"}}, "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "python", "command": [sys.executable, "-c", script]}]}}}}  # fmt: skip


def create(api: ApiServer, body: dict[str, Any]) -> dict[str, Any]:
    res = api.store.resources[("batch", "jobs")]
    out: dict[str, Any] = api.call(lambda s: s.create(res, "default", body)[0])
    return out


def test_intervals_round_trip() -> None:
    assert intervals({0, 1, 2, 4, 6, 7}) == "0-2,4,6-7" and intervals(set()) == ""
    assert parse_intervals("0-2,4,6-7") == {0, 1, 2, 4, 6, 7} and parse_intervals(None) == set()


def test_the_api_server_defaults_and_refuses_jobs_as_a_cluster_does(api: ApiServer) -> None:
    made = create(api, job("ok", "pass"))
    uid = made["metadata"]["uid"]
    assert made["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert made["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "ok"
    assert made["spec"]["backoffLimit"] == 6 and made["spec"]["suspend"] is False and "status" not in made
    per_index = create(api, job("per-index", "pass", backoffLimitPerIndex=1))
    assert per_index["spec"]["backoffLimit"] == 2**31 - 1
    refusals = {
        "spec.template.spec.restartPolicy: Unsupported value: \"Always\"": job("a", "pass"),
        "spec.completions: Required value: when completion mode is Indexed": job("b", "pass", completions=None),
        "spec.backoffLimitPerIndex: Forbidden: requires indexed completion mode":
            job("c", "pass", completionMode="NonIndexed", backoffLimitPerIndex=1),
    }  # fmt: skip
    refusals_body = refusals['spec.template.spec.restartPolicy: Unsupported value: "Always"']
    refusals_body["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    for says, body in refusals.items():
        with pytest.raises(ApiError) as e:
            create(api, body)
        assert says in str(e.value.status()["message"]), e.value.status()
    res = api.store.resources[("batch", "jobs")]
    changed = dict(made, spec={**made["spec"], "template": {**made["spec"]["template"], "spec": {
        **made["spec"]["template"]["spec"], "restartPolicy": "OnFailure"}}})  # fmt: skip
    with pytest.raises(ApiError) as e:
        api.call(lambda s: s.update(res, "default", "ok", changed))
    assert "spec.template: Invalid value: ...: field is immutable" in e.value.status()["message"]


def test_an_indexed_job_runs_each_index_and_retries_only_the_one_that_failed(api: ApiServer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (f"import os, pathlib, sys\ni = os.environ['JOB_COMPLETION_INDEX']\nm = pathlib.Path({str(marks)!r})\n"
              "tries = len(list(m.glob(f'{i}-*')))\n(m / f'{i}-{tries}').touch()\n"
              "sys.exit(3 if i == '1' and tries == 0 else 0)\n")  # fmt: skip
    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    controller = JobController(api.kubeconfig, backoff_seconds=0.5).start()
    try:
        create(api, job("prep", script, backoffLimitPerIndex=1))
        done = wait_for(lambda: next((j for j in api.objects("jobs", "batch") if any(
            c["type"] == "Complete" for c in (j.get("status") or {}).get("conditions") or [])), None), 60,
            "the Job complete", lambda: f"{api.objects('jobs', 'batch')}\n{controller.errors}\n{node.errors}")  # fmt: skip
        status = done["status"]
        assert (status["completedIndexes"], status["succeeded"], status["failed"]) == ("0-2", 3, 1), status
        assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
        assert sorted(p.name for p in marks.iterdir()) == ["0-0", "1-0", "1-1", "2-0"], "only index 1 ran twice"
        pods = api.objects("pods")
        retried = [p for p in pods if p["metadata"]["annotations"].get("batch.kubernetes.io/job-index-failure-count")]
        assert len(pods) == 4 and [p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                                   for p in retried] == ["1"]  # fmt: skip
        assert all(p["metadata"]["name"].startswith(f"prep-{p['spec']['hostname'].rsplit('-', 1)[1]}-")
                   and not p["metadata"].get("finalizers") for p in pods), "counted, and the finalizer released"  # fmt: skip
    finally:
        controller.stop()
        node.stop()


def test_an_index_over_its_backoff_limit_fails_the_job_once_the_others_end(api: ApiServer, tmp_path: Path) -> None:
    script = "import os, sys\nsys.exit(5 if os.environ['JOB_COMPLETION_INDEX'] == '2' else 0)\n"
    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    controller = JobController(api.kubeconfig, backoff_seconds=0.2).start()
    try:
        create(api, job("bad", script, backoffLimitPerIndex=1))
        failed = wait_for(lambda: next((j for j in api.objects("jobs", "batch") if any(
            c["type"] == "Failed" for c in (j.get("status") or {}).get("conditions") or [])), None), 60,
            "the Job failed", lambda: f"{api.objects('jobs', 'batch')}\n{controller.errors}")  # fmt: skip
        status = failed["status"]
        assert (status["completedIndexes"], status["failedIndexes"], status["failed"]) == ("0-1", "2", 2), status
        assert [(c["type"], c["reason"]) for c in status["conditions"]] == [
            ("FailureTarget", "FailedIndexes"),
            ("Failed", "FailedIndexes"),
        ]
    finally:
        controller.stop()
        node.stop()


def test_deleting_a_job_through_the_api_orphans_its_pods_unless_told_otherwise(api: ApiServer) -> None:
    """batch/v1's legacy default: a DELETE without a propagationPolicy leaves the pods (the
    operator must ask for Background); kubectl asks for Background itself."""
    from tests.kubeapi.harness import Kubectl

    pods_res = api.store.resources[("", "pods")]
    for name in ("left", "taken"):
        made = create(api, job(name, "pass"))
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": made["metadata"]["uid"],
                 "controller": True}  # fmt: skip
        pod = {"metadata": {"name": f"{name}-0-x", "ownerReferences": [owner]},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}  # fmt: skip
        api.call(lambda s, p=pod: s.create(pods_res, "default", p))
    jobs_res = api.store.resources[("batch", "jobs")]
    api.call(lambda s: s.delete(jobs_res, "default", "left"))
    wait_for(lambda: [j["metadata"]["name"] for j in api.objects("jobs", "batch")] == ["taken"], 10, "left deleted")
    orphan = wait_for(lambda: next((p for p in api.objects("pods") if p["metadata"]["name"] == "left-0-x"
                                    and not p["metadata"].get("ownerReferences")), None), 10, "the pod orphaned")  # fmt: skip
    assert orphan is not None
    Kubectl(api)("delete", "job", "taken")
    wait_for(lambda: [p["metadata"]["name"] for p in api.objects("pods")] == ["left-0-x"], 10, "taken's pod collected")
