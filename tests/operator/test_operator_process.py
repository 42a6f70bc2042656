"""`pretrain operator` as the chart runs it (Kopf, the `kubernetes` client, a kubeconfig), against
the API emulator, driven by the real kubectl v1.35. No node runs here: pods stay Pending unless a
test writes their status as a kubelet would. The training path is tests/test_system.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver, wait_for
from tests.operator.harness import job_manifest

pytestmark = pytest.mark.slow  # operator processes: not in `make test-fast`


class Env:
    def __init__(self, root: Path) -> None:
        self.api = start_apiserver(root / "api")
        self.kubectl = Kubectl(self.api)
        self.operator = OperatorProcess(self.api, root / "operator.log").start()

    def job(self, name: str) -> dict[str, Any]:
        return next((o for o in self.api.objects("pretrainjobs", "pretrain.io") if o["metadata"]["name"] == name), {})

    def children(self, name: str) -> dict[str, list[str]]:
        return {kind: sorted(o["metadata"]["name"] for o in self.api.objects(kind)
                             if (o["metadata"].get("labels") or {}).get("pretrain.io/job-name") == name)
                for kind in ("pods", "services", "configmaps")}  # fmt: skip

    def wait(self, predicate: Any, what: str, timeout: float = 60) -> Any:
        return wait_for(predicate, timeout, what, lambda: self.operator.text()[-3000:])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("operator"))
    yield e
    e.operator.stop()
    e.api.stop()


def manifest(name: str, **overrides: Any) -> str:
    return yaml.safe_dump(job_manifest(name, overrides), sort_keys=False)


def test_a_spec_the_crd_refuses_gets_the_api_servers_error(env: Env) -> None:
    p = env.kubectl("apply", "-f", "-", stdin=manifest("bad", **{"training.globalBatchSize": 30}), check=False)
    assert p.returncode == 1
    assert ('The PretrainJob "bad" is invalid: spec.training.globalBatchSize: Invalid value: "object": '
            "training.globalBatchSize must be divisible by microBatchSize x nodes x procsPerNode") in p.stderr  # fmt: skip
    p = env.kubectl("apply", "-f", "-", stdin=manifest("bad", **{"training.optimizer.lrr": 1}), check=False)
    assert p.returncode == 1 and 'strict decoding error: unknown field "spec.training.optimizer.lrr"' in p.stderr
    assert env.job("bad") == {}


def test_apply_creates_the_children_and_status_then_delete_collects_them(env: Env) -> None:
    name = "lifecycle"
    out = env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                                  "checkpoint.uri": "s3://bucket/ck"})).stdout  # fmt: skip
    assert f"pretrainjob.pretrain.io/{name} created" in out
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a1-n0", f"{name}-a1-n1"], "two pods")
    assert env.children(name) == {"pods": [f"{name}-a1-n0", f"{name}-a1-n1"], "services": [name],
                                  "configmaps": [f"{name}-config"]}  # fmt: skip
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Pending", "phase Pending")
    table = env.kubectl("get", "ptj", name).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "NODES", "STEP", "LOSS", "TOKENS/S", "RESTARTS", "REASON", "AGE"]
    assert table[1].split()[:4] == [name, "Pending", "2", "0"], table
    pods = env.kubectl("get", "pods", "-l", f"pretrain.io/job-name={name}", "-o", "json").stdout
    assert [p["status"]["phase"] for p in json.loads(pods)["items"]] == ["Pending", "Pending"]
    job = env.job(name)
    assert not job["metadata"].get("finalizers") and not job["metadata"].get("annotations", {}).keys() - {
        "kubectl.kubernetes.io/last-applied-configuration"}, "the operator keeps nothing on the job that deletion waits for"  # fmt: skip

    env.kubectl("delete", "ptj", name, timeout=60)  # kubectl waits until the job is gone
    assert env.job(name) == {}
    env.wait(lambda: env.children(name) == {"pods": [], "services": [], "configmaps": []}, "children collected")


def test_spec_edits_mutable_ones_reach_the_configmap_immutable_ones_are_refused(env: Env) -> None:
    name = "edits"
    env.kubectl("apply", "-f", "-", stdin=manifest(name))
    env.wait(lambda: env.children(name)["configmaps"], "the ConfigMap")
    p = env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"model.layers": 8}), check=False)
    assert p.returncode == 1 and "model is immutable" in p.stderr
    assert "configured" in env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"training.maxSteps": 77})).stdout
    assert env.job(name)["metadata"]["generation"] == 2

    def config_steps() -> int:
        cm = next(o for o in env.api.objects("configmaps") if o["metadata"]["name"] == f"{name}-config")
        return int(json.loads(cm["data"]["job.json"])["spec"]["training"]["maxSteps"])

    env.wait(lambda: config_steps() == 77, "the ConfigMap to follow the edit")
    env.wait(lambda: env.job(name).get("status", {}).get("observedGeneration") == 2, "observedGeneration 2")
    env.kubectl("delete", "ptj", name, timeout=60)


def test_a_spec_only_the_operator_can_judge_fails_with_a_one_line_condition(env: Env) -> None:
    """Two nodes without a shared checkpoint location pass the CRD but not the operator."""
    name = "invalid"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1}))
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Failed", "phase Failed")
    status = env.job(name)["status"]
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.checkpoint.uri: required with 2 nodes")
    assert "\n" not in invalid["message"] and env.children(name)["pods"] == []
    described = env.kubectl("describe", "ptj", name).stdout
    assert re.search(r"Warning\s+InvalidSpec", described), described
    env.kubectl("delete", "ptj", name, timeout=60)


def test_status_writes_hold_up_while_others_write_the_job(env: Env) -> None:
    """Other writers (the progress timer, `kubectl label`, Kueue) change the job between the
    operator's read and its status write. Merge patches to /status carry no resourceVersion, so
    none of them conflicts; a replace of the read object would answer 409 and fail the handler."""
    import time

    import kubernetes

    name = "busy"
    env.kubectl("apply", "-f", "-", stdin=manifest(name))
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Pending", "phase Pending")
    custom = kubernetes.client.CustomObjectsApi(
        kubernetes.config.new_client_from_config(config_file=str(env.api.kubeconfig))
    )
    before = env.operator.text()
    deadline = time.monotonic() + 6
    i = 0
    while time.monotonic() < deadline:
        i += 1
        custom.patch_namespaced_custom_object_status(
            "pretrain.io", "v1alpha1", "default", "pretrainjobs", name, {"status": {"progress": {"step": i}}}
        )
        time.sleep(0.05)
    time.sleep(2)
    during = env.operator.text()[len(before) :]
    assert "failed with an exception" not in during and "reconcile failed" not in during, during[-3000:]
    puts = [r for r in env.api.store.requests if r == ("put", "pretrainjobs")]
    assert puts == [], "status is written with merge patches, never a replace of what was read"
    status = env.job(name)["status"]
    assert status["phase"] == "Pending" and status["progress"]["step"] == i, "the operator kept what others wrote"
    env.kubectl("delete", "ptj", name, timeout=60)


def test_kubectl_get_watch_follows_the_job(env: Env) -> None:
    """`kubectl get ptj -w`: the printer columns of every change, from the watch stream."""
    import os
    import subprocess
    import time

    from tests.kubeapi.harness import KUBECTL

    name = "watched"
    cmd = [
        str(KUBECTL),
        "--cache-dir",
        str(env.api.workdir / "kubectl-cache"),
        "get",
        "ptj",
        "-w",
        "--output-watch-events",
    ]
    watcher = subprocess.Popen(cmd, env={**os.environ, "KUBECONFIG": str(env.api.kubeconfig)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        time.sleep(1.5)  # the watch is open before the job exists
        env.kubectl("apply", "-f", "-", stdin=manifest(name))
        env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Pending", "phase Pending")
        env.kubectl("delete", "ptj", name, timeout=60)
        time.sleep(1)
    finally:
        watcher.terminate()
        out = watcher.communicate(timeout=10)[0]
    rows = [line.split() for line in out.splitlines() if name in line]
    assert rows[0][:2] == ["ADDED", name], out
    assert any(r[0] == "MODIFIED" and r[2] == "Pending" for r in rows), out
    assert rows[-1][:2] == ["DELETED", name], out


def _client(env: Env) -> Any:
    import kubernetes

    return kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(env.api.kubeconfig)))


def test_a_pod_failure_restarts_the_gang_from_its_watch_event(env: Env) -> None:
    """The operator reconciles a job every 300 s when nothing happens; a failed pod is acted on
    from its watch event, and the backoff's expiry from the plan's requeue time."""
    name = "event-driven"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                            "checkpoint.uri": "s3://b/c", "runPolicy.restartBackoffSeconds": 2}))  # fmt: skip
    env.wait(lambda: len(env.children(name)["pods"]) == 2, "two pods")
    core = _client(env)
    for pod in env.children(name)["pods"]:
        core.patch_namespaced_pod_status(pod, "default", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Running", "phase Running", timeout=20)
    term = {"exitCode": 1, "reason": "Error", "message": "RuntimeError: boom"}
    core.patch_namespaced_pod_status(f"{name}-a1-n1", "default", {"status": {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "i", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": term}}]}})  # fmt: skip
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Restarting", "phase Restarting", timeout=20)
    status = env.job(name)["status"]
    assert (
        status["restarts"] == 1
        and "tiny" not in status["message"]
        and "failed (exit code 1): RuntimeError: boom" in status["message"]
    )
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a2-n0", f"{name}-a2-n1"], "the new gang", timeout=20)
    env.kubectl("delete", "ptj", name, timeout=60)


def test_deleting_a_job_needs_no_operator(env: Env) -> None:
    name = "orphaned"
    env.kubectl("apply", "-f", "-", stdin=manifest(name))
    env.wait(lambda: env.children(name)["pods"] and env.children(name)["configmaps"], "children")
    env.operator.stop()
    try:
        env.kubectl("delete", "ptj", name, timeout=30)  # kubectl waits until the job is gone
        assert env.job(name) == {}
        env.wait(lambda: env.children(name) == {"pods": [], "services": [], "configmaps": []}, "children collected")
    finally:
        env.operator.start()


def test_a_refused_pod_leaves_a_condition_and_an_event_and_nothing_is_deleted(env: Env) -> None:
    """A quota that refuses the second pod: the first stays, the job says why, and once the quota
    allows it the missing pod is created."""
    from tests.kubeapi.store import ApiError

    name = "quota"

    def quota(res: Any, obj: dict[str, Any]) -> ApiError | None:
        if res.kind == "Pod" and obj["metadata"]["name"] == f"{name}-a1-n1":
            return ApiError(403, "Forbidden", f'pods "{name}-a1-n1" is forbidden: exceeded quota: gpu, requested: '
                            "nvidia.com/gpu=1, used: nvidia.com/gpu=8, limited: nvidia.com/gpu=8")  # fmt: skip
        return None

    env.api.call(lambda s: s.admission.append(quota))
    try:
        env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                                "checkpoint.uri": "s3://b/c"}))  # fmt: skip

        def failed() -> dict[str, Any] | None:
            conds = env.job(name).get("status", {}).get("conditions", [])
            return next((c for c in conds if c["type"] == "ApplyFailed" and c["status"] == "True"), None)

        cond = env.wait(failed, "the ApplyFailed condition")
        assert cond["reason"] == "Forbidden" and "exceeded quota" in cond["message"]
        assert re.search(r"Warning\s+Forbidden", env.kubectl("describe", "ptj", name).stdout)
        import time

        time.sleep(3)  # several retries later, the pod that was created is still there
        assert env.children(name)["pods"] == [f"{name}-a1-n0"]
    finally:
        env.api.call(lambda s: s.admission.remove(quota))
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a1-n0", f"{name}-a1-n1"], "the missing pod", timeout=90)
    env.wait(lambda: not failed(), "the condition cleared")
    env.kubectl("delete", "ptj", name, timeout=60)


def test_pods_start_without_the_prometheus_operator(env: Env) -> None:
    name = "no-podmonitor-crd"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"monitoring.podMonitor": True}))
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a1-n0"], "the pod")

    def unavailable() -> dict[str, Any] | None:
        conds = env.job(name).get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "PodMonitorUnavailable" and c["status"] == "True"), None)

    cond = env.wait(unavailable, "the PodMonitorUnavailable condition")
    assert "Prometheus Operator" in cond["message"] and env.job(name)["status"]["phase"] == "Pending"
    env.kubectl("delete", "ptj", name, timeout=60)


def _bind_and_run(env: Env, core: Any, pods: list[str]) -> None:
    """What the scheduler and a kubelet do: bind each pod to a node, then report it Running."""
    import kubernetes

    for pod in pods:
        binding = kubernetes.client.V1Binding(metadata=kubernetes.client.V1ObjectMeta(name=pod),
                                              target=kubernetes.client.V1ObjectReference(kind="Node", name="node-1"))  # fmt: skip
        core.create_namespaced_pod_binding(pod, "default", binding, _preload_content=False)
        core.patch_namespaced_pod_status(pod, "default", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})


def test_a_preempted_pod_restarts_the_gang_without_counting(env: Env) -> None:
    """The scheduler preempts node 1: it marks the pod DisruptionTarget, then deletes it
    gracefully. With maxRestarts 0 the job goes on: a disruption is not the job's failure."""
    name = "preempted"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                            "checkpoint.uri": "s3://b/c", "runPolicy.maxRestarts": 0}))  # fmt: skip
    env.wait(lambda: len(env.children(name)["pods"]) == 2, "two pods")
    core = _client(env)
    _bind_and_run(env, core, env.children(name)["pods"])
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Running", "phase Running", timeout=20)
    victim = f"{name}-a1-n1"
    core.patch_namespaced_pod_status(victim, "default", {"status": {"conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
         "message": "default-scheduler: preempting to accommodate a higher priority pod"}]}})  # fmt: skip
    core.delete_namespaced_pod(victim, "default")
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Restarting", "phase Restarting", timeout=20)
    status = env.job(name)["status"]
    assert status["restarts"] == 0 and status["uncountedRestarts"] == 1, status
    assert f"{victim} was disrupted (DisruptionTarget, PreemptionByScheduler)" in status["message"]
    assert "not counted against maxRestarts" in status["message"]
    env.kubectl("delete", "ptj", name, timeout=60)


def test_oom_counts_and_a_failfast_rule_fails_the_job(env: Env) -> None:
    name = "policy"
    rules = [{"name": "bad-input", "action": "FailJob", "onExitCodes": {"values": [3]}}]
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                            "checkpoint.uri": "s3://b/c", "runPolicy.restartBackoffSeconds": 0,
                                                            "runPolicy.failurePolicy": {"rules": rules}}))  # fmt: skip
    core = _client(env)

    def fail(pod: str, code: int, reason: str) -> None:
        term = {"exitCode": code, "reason": reason, "message": "" if reason == "OOMKilled" else "error: bad input"}
        core.patch_namespaced_pod_status(pod, "default", {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "image": "i", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": term}}]}})  # fmt: skip

    for attempt, code, reason in ((1, 137, "OOMKilled"), (2, 3, "Error")):
        gang = [f"{name}-a{attempt}-n0", f"{name}-a{attempt}-n1"]
        env.wait(lambda: env.children(name)["pods"] == gang, f"gang {attempt}", timeout=30)  # noqa: B023
        for pod in gang:
            core.patch_namespaced_pod_status(pod, "default", {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
        env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Running", "phase Running", timeout=20)
        fail(gang[0], code, reason)
        if attempt == 1:
            env.wait(lambda: env.job(name).get("status", {}).get("restarts") == 1, "a counted restart", timeout=20)
            restart = next(e for e in env.api.objects("events")
                           if e["involvedObject"]["name"] == name and e["reason"] == "GangRestart")  # fmt: skip
            assert f"{gang[0]} was OOMKilled (exit code 137)" in restart["message"]
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Failed", "phase Failed", timeout=20)
    failed = next(c for c in env.job(name)["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "FailedByPolicy" and "failurePolicy rule 1 (bad-input): FailJob" in failed["message"]
    assert re.search(r"Warning\s+FailedByPolicy", env.kubectl("describe", "ptj", name).stdout)
    env.kubectl("delete", "ptj", name, timeout=60)


def test_an_unschedulable_gang_is_suspended_when_the_spec_says_so(env: Env) -> None:
    name = "unschedulable"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"runPolicy.schedulingTimeoutSeconds": 2,
                                                            "runPolicy.schedulingTimeoutAction": "Suspend"}))  # fmt: skip
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Suspended", "phase Suspended", timeout=30)
    # Two writes, the status and then the spec's suspend: a read may fall between them.
    env.wait(lambda: env.job(name)["spec"]["runPolicy"].get("suspend") is True, "spec.runPolicy.suspend set")
    job = env.job(name)
    assert next(c for c in job["status"]["conditions"] if c["type"] == "Unschedulable")["status"] == "True"
    env.wait(lambda: env.children(name)["pods"] == [], "the pods deleted")
    env.kubectl("patch", "ptj", name, "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a2-n0"], "a new attempt after the resume", timeout=30)
    env.kubectl("delete", "ptj", name, timeout=60)


def test_the_deadline_counts_running_time_and_pods_form_a_kueue_group(env: Env) -> None:
    """Suspended for longer than the whole deadline, the job resumes and runs on; it fails with
    DeadlineExceeded only once its running time is used up. Its pods form a Kueue pod group."""
    import time

    name = "deadline"
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"resources.nodes": 2, "resources.procsPerNode": 1,
                                                            "checkpoint.uri": "s3://b/c", "resources.queueName": "team-a",
                                                            "runPolicy.activeDeadlineSeconds": 6}))  # fmt: skip
    env.wait(lambda: len(env.children(name)["pods"]) == 2, "two pods")
    pods = [p for p in env.api.objects("pods") if p["metadata"]["labels"].get("pretrain.io/job-name") == name]
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for p in pods} == {"team-a"}
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in pods} == {f"{name}-a1"}
    assert {p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for p in pods} == {"2"}
    env.kubectl("patch", "ptj", name, "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Suspended", "phase Suspended")
    time.sleep(8)  # longer than the whole deadline
    env.wait(lambda: env.children(name)["pods"] == [], "the pods gone")
    env.kubectl("patch", "ptj", name, "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    env.wait(lambda: env.children(name)["pods"] == [f"{name}-a2-n0", f"{name}-a2-n1"], "attempt 2")
    status = env.job(name)["status"]
    assert status["phase"] == "Pending" and status["suspendedSeconds"] >= 8, status
    env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Failed", "DeadlineExceeded", timeout=30)
    failed = next(c for c in env.job(name)["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    env.kubectl("delete", "ptj", name, timeout=60)


def test_a_recreated_job_waits_for_the_old_pods_and_never_touches_pods_it_does_not_own(env: Env) -> None:
    """Issue 27 items 1-2. `kubectl delete ptj same && kubectl apply -f same.yaml` while the old
    pod terminates (bound to a node, it goes only when its kubelet confirms, as trainer pods
    take their grace period): the new job counted the old `same-a1-n0` as its own failed pod
    and, with maxRestarts 0, went Failed. And a pod someone else made with the job's label
    was deleted at once."""
    import time

    name = "same"
    pods = ("", "pods")
    env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"runPolicy.maxRestarts": 0}))
    old = env.wait(lambda: next((p for p in env.api.objects("pods") if p["metadata"]["name"] == f"{name}-a1-n0"), None),
                   "the first job's pod")  # fmt: skip
    env.api.call(lambda s: s.bind("default", f"{name}-a1-n0", "node-a"))
    env.api.store.GC_DELAY = 3.0  # a cluster's collector is slower than the emulator's 50 ms
    try:
        env.kubectl("delete", "ptj", name, "--wait=false")
        env.wait(lambda: env.job(name) == {}, "the first job gone")
        # applied again before the collector has even marked the old pod for deletion
        env.kubectl("apply", "-f", "-", stdin=manifest(name, **{"runPolicy.maxRestarts": 0}))
        old_pod = lambda: [p for p in env.api.objects("pods") if p["metadata"]["name"] == f"{name}-a1-n0"]  # noqa: E731
        assert old_pod() and not old_pod()[0]["metadata"].get("deletionTimestamp"), "the old pod, not yet collected"
        env.wait(lambda: env.job(name).get("status", {}).get("reason") == "WaitingForPreviousJob", "waiting shown")
        env.wait(lambda: all(p["metadata"].get("deletionTimestamp") for p in old_pod()), "the old pod terminating")
    finally:
        env.api.store.GC_DELAY = type(env.api.store).GC_DELAY
    time.sleep(2)  # reconciles go on (the old pod's watch events queue the job): it keeps waiting
    status = env.job(name)["status"]
    assert status["phase"] == "Pending" and status.get("restarts", 0) == 0, status
    assert f"pod {name}-a1-n0" in status["message"] and "earlier PretrainJob named same" in status["message"]

    env.api.call(lambda s: s.delete(s.resources[pods], "default", f"{name}-a1-n0", grace=0))  # the kubelet confirms
    uid = env.job(name)["metadata"]["uid"]
    new = env.wait(lambda: next((p for p in env.api.objects("pods") if p["metadata"]["name"] == f"{name}-a1-n0"
                                 and p["metadata"]["ownerReferences"][0]["uid"] == uid), None), "the new job's pod")  # fmt: skip
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    env.wait(lambda: env.job(name)["status"].get("attempt") == 1, "the new job started")
    assert (env.job(name)["status"]["phase"], env.job(name)["status"]["reason"]) == ("Pending", "Created")

    intruder = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "intruder", "labels": {"pretrain.io/job-name": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}  # fmt: skip
    env.kubectl("apply", "-f", "-", stdin=json.dumps(intruder))
    env.kubectl("annotate", "ptj", name, "poke=1")  # a reconcile
    time.sleep(2)
    assert "intruder" in [p["metadata"]["name"] for p in env.api.objects("pods")], "someone else's pod is left alone"
    assert env.job(name)["status"]["phase"] == "Pending" and env.job(name)["status"].get("restarts", 0) == 0
    env.kubectl("delete", "pod", "intruder")
    env.kubectl("delete", "ptj", name, timeout=60)


def test_a_pod_that_cannot_start_says_why_and_a_rule_fails_fast(env: Env, tmp_path: Path) -> None:
    """Issue 27 item 3: a bound pod waiting with CreateContainerConfigError (a missing Secret),
    or ErrImagePull for a wrong tag, was reported as "Unschedulable: pod(s) pending longer than
    ...s", without the kubelet's words. The stand-in kubelet refuses both as a kubelet does."""
    from tests.kubelet import Kubelet

    node = Kubelet(
        env.api.kubeconfig, tmp_path / "node", images={"ghcr.io/pretrain-io/pretrain-trainer-cpu:0.1.0"}
    ).start()
    try:
        name = "nosecret"
        env.kubectl("apply", "-f", "-", stdin=manifest(name, **{
            "checkpoint.uri": "s3://b/c", "checkpoint.credentialsSecret": "missing-creds",
            "runPolicy.schedulingTimeoutSeconds": 1}))  # fmt: skip
        env.wait(lambda: env.job(name).get("status", {}).get("reason") == "CreateContainerConfigError",
                 "the kubelet's reason in status")  # fmt: skip
        time.sleep(2)  # past the scheduling timeout: still not called a scheduling problem
        status = env.job(name)["status"]
        assert status["phase"] == "Pending"
        assert (
            status["message"]
            == f'pod {name}-a1-n0 cannot start (CreateContainerConfigError): secret "missing-creds" not found'
        )
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["CannotStart"]["status"] == "True"
        assert conditions.get("Unschedulable", {}).get("status") != "True", conditions
        row = env.kubectl("get", "ptj", name).stdout.splitlines()[1].split()
        assert row[1:2] + row[-2:-1] == ["Pending", "CreateContainerConfigError"], row
        assert 'secret "missing-creds" not found' in env.kubectl("get", "ptj", name, "-o", "wide").stdout
        assert re.search(r"Warning\s+CreateContainerConfigError", env.kubectl("describe", "ptj", name).stdout)
        env.kubectl("delete", "ptj", name, timeout=60)

        name = "badimage"
        rules = [{"name": "no-image", "action": "FailJob", "onReasons": ["ErrImagePull", "ImagePullBackOff"]}]
        env.kubectl("apply", "-f", "-", stdin=manifest(name, **{
            "resources.image": "ghcr.io/pretrain-io/pretrain-trainer-cpu:no-such-tag",
            "runPolicy.failurePolicy": {"rules": rules}}))  # fmt: skip
        env.wait(lambda: env.job(name).get("status", {}).get("phase") == "Failed", "phase Failed")
        status = env.job(name)["status"]
        assert status["reason"] == "FailedByPolicy", status
        assert status["message"].startswith(f"pod {name}-a1-n0 cannot start (ErrImagePull): failed to pull")
        assert "failurePolicy rule 1 (no-image): FailJob" in status["message"]
        env.kubectl("delete", "ptj", name, timeout=60)
    finally:
        node.stop()


@pytest.mark.parametrize("watch", [("default",), ()], ids=["namespaced", "cluster-wide"])
def test_the_operator_needs_no_more_than_the_charts_rbac(tmp_path: Path, watch: tuple[str, ...]) -> None:
    """Issue 27 items 5-6: the emulator authorises the operator's every request against the
    Roles and bindings `helm template` renders (namespaced: Roles only). A namespaced install
    used to spend about a minute on 403s (Kopf listing namespaces and CRDs) before its first
    reconcile; now nothing is refused. Taking one rule out of the chart fails the job's start."""
    import copy

    from tests.kubeapi.harness import OperatorProcess, chart_rbac, start_apiserver

    api = start_apiserver(tmp_path / "api")
    kubectl = Kubectl(api)
    try:
        op = OperatorProcess(api, tmp_path / "op.log", watch=watch).start()
        kubectl("apply", "-f", "-", stdin=manifest("rbac"))
        wait_for(lambda: any(p["metadata"]["name"] == "rbac-a1-n0" for p in api.objects("pods")), 30, "the pod",
                 lambda: op.text()[-3000:])  # fmt: skip
        assert api.refusals == [], api.refusals[:3]
        op.stop()

        _, rbac = chart_rbac("default", watch)
        trimmed = copy.deepcopy(rbac)
        for doc in trimmed:
            doc["rules"] = [r for r in doc.get("rules") or [] if r.get("resources") != ["pods"]]
        op = OperatorProcess(api, tmp_path / "op2.log", watch=watch, rbac=trimmed).start()
        kubectl("apply", "-f", "-", stdin=manifest("norule"))
        wait_for(lambda: any('cannot list resource "pods"' in r or 'cannot create resource "pods"' in r
                             for r in api.refusals), 30, "a refusal", lambda: op.text()[-3000:])  # fmt: skip
        assert not any(p["metadata"]["name"] == "norule-a1-n0" for p in api.objects("pods"))
        op.stop()
    finally:
        api.stop()


def test_kubectl_explain_and_server_side_apply(env: Env) -> None:
    """Issue 27 item 6: the emulator serves the CRD's OpenAPI v3 schema (`kubectl explain`) and
    answers server-side apply (create, then merge; field ownership is not kept)."""
    explained = env.kubectl("explain", "pretrainjob.spec.checkpoint").stdout
    assert "credentialsSecret\t<string>" in explained and "Checkpoints and resume." in explained
    name = "ssa"
    out = env.kubectl("apply", "--server-side", "-f", "-", stdin=manifest(name)).stdout
    assert f"pretrainjob.pretrain.io/{name} serverside-applied" in out
    env.kubectl("apply", "--server-side", "-f", "-", stdin=manifest(name, **{"training.maxSteps": 77}))
    assert env.job(name)["spec"]["training"]["maxSteps"] == 77 and env.job(name)["metadata"]["generation"] == 2
    env.kubectl("delete", "ptj", name, timeout=60)
