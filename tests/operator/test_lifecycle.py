"""Job lifecycles through the Kopf handlers over the in-memory cluster."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.operator.harness import Harness, job_body


def two_nodes(**extra: object) -> dict[str, object]:
    return {"resources.nodes": 2, "resources.procsPerNode": 1, "checkpoint.uri": "s3://bucket/ck", **extra}


def test_happy_path() -> None:
    h = Harness(job_body(two_nodes()))
    h.reconcile()
    kinds = sorted(k for k, _, _ in h.cluster.objects)
    assert kinds == ["ConfigMap", "Pod", "Pod", "Service"]
    assert h.pod_names() == ["tiny-a1-n0", "tiny-a1-n1"]
    assert h.phase == "Pending" and h.status["attempt"] == 1 and h.status["restarts"] == 0
    h.reconcile()  # nothing changes while pods are pending
    assert len(h.cluster.pods()) == 2
    h.run_all()
    h.reconcile()
    assert h.phase == "Running" and h.condition("Running")["status"] == "True"
    h.finish_all()
    h.reconcile()
    assert h.phase == "Succeeded" and "completionTime" in h.status
    assert h.events() == ["Created", "Running", "Completed"]
    assert h.status["observedGeneration"] == 1


def test_gang_restart_then_success() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 10})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n1", "Failed", exit_code=137, message="OOMKilled")
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 1
    assert "tiny-a1-n1 was killed by SIGKILL (exit code 137); its last log line: OOMKilled" in h.status["message"]
    assert all(p["metadata"].get("deletionTimestamp") for p in h.cluster.pods()), "the whole gang is deleted"
    h.cluster.settle()
    h.reconcile()
    assert h.pod_names() == [], "waits for the backoff"
    h.advance(11)
    h.reconcile()
    assert h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"] and h.status["attempt"] == 2
    assert h.phase == "Pending"
    h.run_all()
    h.reconcile()
    h.finish_all()
    h.reconcile()
    assert h.phase == "Succeeded" and h.status["restarts"] == 1
    assert "GangRestart" in h.events() and "Restarted" in h.events()


def test_disappeared_pod_restarts_the_gang() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.remove("tiny-a1-n0")
    h.reconcile()
    assert h.phase == "Restarting" and "tiny-a1-n0 disappeared" in h.status["message"]


def test_restarts_exhausted_fail_with_exit_code() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 1, "runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    for attempt in (1, 2):
        h.run_all()
        h.reconcile()
        h.cluster.set_phase(f"tiny-a{attempt}-n0", "Failed", exit_code=2, message="error: training failed: boom")
        h.reconcile()
        h.cluster.settle()
        h.reconcile()
    assert h.phase == "Failed"
    assert h.status["restarts"] == 1
    assert "exit code 2" in h.status["message"] and "boom" in h.status["message"]
    assert h.condition("Failed")["reason"] == "RestartsExhausted"
    h.reconcile()
    assert h.pod_names() == [] or all(
        h.cluster.objects[("Pod", "default", n)]["status"]["phase"] == "Failed" for n in h.pod_names()
    )


def test_suspend_and_resume() -> None:
    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.body["spec"]["runPolicy"] = {"suspend": True}
    h.reconcile()
    assert h.phase == "Suspended" and h.condition("Suspended")["status"] == "True"
    h.cluster.settle()
    h.reconcile()
    assert h.pod_names() == []
    h.body["spec"]["runPolicy"] = {"suspend": False}
    h.reconcile()
    assert h.phase == "Pending" and h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"]
    assert h.status["restarts"] == 0, "a suspension is not a failure"


def test_deadline_fails_the_job() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.activeDeadlineSeconds": 60})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.advance(61)
    h.reconcile()
    assert h.phase == "Failed" and h.condition("Failed")["reason"] == "DeadlineExceeded"
    assert all(p["metadata"].get("deletionTimestamp") for p in h.cluster.pods())


def test_ttl_deletes_the_job_after_the_end() -> None:
    """As Job, JobSet and TrainJob: the job itself goes (its children with it), not only its
    children (issue 27 item 8)."""
    h = Harness(job_body(two_nodes(**{"runPolicy.ttlSecondsAfterFinished": 100, "runPolicy.cleanPodPolicy": "None"})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.finish_all()
    h.reconcile()
    assert h.phase == "Succeeded" and len(h.pod_names()) == 2, "cleanPodPolicy None keeps finished pods"
    h.advance(50)
    h.reconcile()
    assert len(h.cluster.objects) == 4
    h.advance(51)
    h.reconcile()
    h.cluster.settle()
    assert h.cluster.objects == {} and h.cluster.jobs == {}
    assert "TTLExpired" in h.events()


def test_a_failed_job_has_no_completion_time_and_its_ttl_counts_from_the_failure() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.ttlSecondsAfterFinished": 30, "runPolicy.maxRestarts": 0})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1, message="boom")
    h.reconcile()
    assert h.phase == "Failed" and "completionTime" not in h.status
    assert h.condition("Failed")["reason"] == "RestartsExhausted", "the same reason with maxRestarts 0"
    h.advance(31)
    h.reconcile()
    assert h.cluster.jobs == {}


def test_operator_restart_mid_job_duplicates_nothing() -> None:
    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    before = dict(h.cluster.objects)
    # A new operator process: nothing carried over but the cluster and the job's status (a
    # reconcile holds no state of its own)
    h.reconcile()
    h.reconcile()
    assert h.cluster.objects.keys() == before.keys()
    assert h.phase == "Running"
    # and when it stopped half-way through creating a gang, the rest is created once
    del h.cluster.objects[("Pod", "default", "tiny-a1-n1")]
    h.status["phase"] = "Pending"
    h.reconcile()
    assert h.pod_names() == ["tiny-a1-n0", "tiny-a1-n1"]


def test_invalid_spec_is_reported_and_operator_keeps_going() -> None:
    bad = job_body({"training.globalBatchSize": 33})
    h = Harness(bad)
    h.reconcile()
    assert h.phase == "Failed"
    cond = h.condition("Invalid")
    assert cond["status"] == "True"
    assert (
        cond["message"]
        == "spec.training.globalBatchSize: 33 is not divisible by microBatchSize x world size (8 x 2 = 16)"
    )
    assert h.cluster.objects == {}
    h.body["spec"]["training"]["globalBatchSize"] = 32  # the user fixes it
    h.reconcile()
    assert h.phase == "Pending" and h.condition("Invalid")["status"] == "False"


def test_unschedulable_condition_and_event() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.schedulingTimeoutSeconds": 120})))
    h.reconcile()
    h.advance(121)
    h.reconcile()
    cond = h.condition("Unschedulable")
    assert cond["status"] == "True" and "pending longer than 120s" in cond["message"]
    h.reconcile()
    assert h.events().count("Unschedulable") == 1
    h.run_all()
    h.reconcile()
    assert h.condition("Unschedulable")["status"] == "False"


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, int, list[str]]]:
    body = [
        "# HELP pretrain_step Optimizer steps completed.\n# TYPE pretrain_step gauge\n"
        'pretrain_step{job="tiny",rank="0"} 120.0\npretrain_total_steps{job="tiny"} 500.0\n'
        'pretrain_train_loss{job="tiny"} 1.875\npretrain_tokens_per_second{job="tiny"} 10250.5\n'
        'pretrain_step_duration_seconds_sum{job="tiny"} 48.0\npretrain_step_duration_seconds_count{job="tiny"} 120.0\n'
        'pretrain_checkpoint_last_verified_step{job="tiny"} 100.0\n'
        'pretrain_checkpoint_last_verified_timestamp_seconds{job="tiny"} 1.7643e+09\n'
        'pretrain_eval_metric{attempt="1",metric="accuracy",pretrain_job="tiny"} 0.8125\n'
    ]

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body[0].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield "127.0.0.1", srv.server_port, body
    srv.shutdown()


def test_progress_scraped_from_a_metrics_endpoint(metrics_server: tuple[str, int, list[str]]) -> None:
    host, port, _ = metrics_server
    h = Harness(job_body({"monitoring.metricsPort": port, "checkpoint.uri": "s3://bucket/ck"}))
    h.reconcile()
    h.run_all()
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["status"]["podIP"] = host
    h.reconcile()
    h.progress()
    prog = h.status["progress"]
    assert prog["step"] == 120 and prog["totalSteps"] == 500 and prog["percent"] == 24.0
    assert prog["loss"] == 1.875 and prog["tokensPerSecond"] == 10250.5
    assert prog["etaSeconds"] == 48.0 / 120 * 380
    assert h.status["lastCheckpoint"]["step"] == 100
    assert h.status["lastCheckpoint"]["uri"] == "s3://bucket/ck/step-00000100"
    assert h.status["evaluation"] == {"accuracy": 0.8125}


def test_a_trainer_retrying_its_storage_shows_as_storage_unavailable(
    metrics_server: tuple[str, int, list[str]],
) -> None:
    """Issue 27 item 7: pods that run while their trainer retries an unreachable checkpoint
    endpoint showed as Running "all 1 pod(s) running" for minutes per attempt. Node 0 serves the
    call it is retrying from before its first step; the job says StorageUnavailable (with a
    Warning event) until the call goes through, and a record left by an earlier attempt is not
    taken for the current one."""
    host, port, body = metrics_server
    retrying = (
        'pretrain_storage_retrying_since_timestamp_seconds{rank="0"} 1.7643e+09\n'
        'pretrain_storage_retrying_info{error="EndpointConnectionError: Could not connect",'
        'operation="take the checkpoint lease",rank="0"} 1.0\n'
    )
    good = body[0]
    body[0] = retrying  # still setting up: no step yet
    h = Harness(job_body({"monitoring.metricsPort": port, "checkpoint.uri": "s3://bucket/ck"}))
    h.reconcile()
    h.run_all()
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["status"]["podIP"] = host
    h.reconcile()
    assert (h.phase, h.status["reason"]) == ("Running", "Running")
    h.progress()
    h.reconcile()  # the status write is a watch event: a reconcile follows
    assert (h.phase, h.status["reason"]) == ("Running", "StorageUnavailable"), h.status
    assert "take the checkpoint lease failed (EndpointConnectionError: Could not connect)" in h.status["message"]
    assert "since 2025-11-28T03:20:00Z:" in h.status["message"] and "step" not in h.status["progress"]
    assert h.events()[-1] == "StorageUnavailable" and h.cluster.events[-1][1].type == "Warning"
    body[0] = good  # the call went through; training
    h.progress()
    h.reconcile()
    assert (h.phase, h.status["reason"]) == ("Running", "Running") and h.status["progress"]["step"] == 120
    assert "storageRetrying" not in h.status["progress"]
    h.status["progress"]["storageRetrying"] = {"since": "x", "operation": "y", "error": "z", "attempt": 0}
    h.reconcile()
    assert h.status["reason"] == "Running", "an earlier attempt's record is not this attempt's"


def test_failed_scrape_keeps_old_progress() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    h = Harness(job_body({"monitoring.metricsPort": closed}))
    h.reconcile()
    h.run_all()
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["status"]["podIP"] = "127.0.0.1"
    h.reconcile()
    h.status["progress"] = {"step": 7}
    h.progress()
    assert h.status["progress"] == {"step": 7} and h.phase == "Running"


def test_mutable_spec_edit_reaches_the_next_attempt() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.body["spec"]["training"]["logInterval"] = 5
    h.body["metadata"]["generation"] = 2
    h.reconcile()
    config = h.cluster.objects[("ConfigMap", "default", "tiny-config")]["data"]["job.json"]
    assert '"logInterval": 5' in config
    assert h.status["observedGeneration"] == 2
    assert h.pod_names() == ["tiny-a1-n0", "tiny-a1-n1"], "running pods are left alone"


def test_operator_metrics_are_exported() -> None:
    import subprocess

    from prometheus_client import generate_latest

    from pretrain.operator.metrics import REGISTRY

    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1)
    h.reconcile()
    text = generate_latest(REGISTRY).decode()
    assert 'pretrain_operator_jobs{phase="Restarting"}' in text
    assert 'pretrain_operator_restarts_total{namespace="default"}' in text
    assert "pretrain_operator_reconcile_duration_seconds_count" in text
    import shutil

    if shutil.which("promtool"):
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- failure policy


def running(h: Harness) -> Harness:
    h.reconcile()
    h.run_all()
    h.reconcile()
    assert h.phase == "Running"
    return h


def test_preempted_pod_restarts_without_counting_even_with_max_restarts_zero() -> None:
    h = running(Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 0, "runPolicy.restartBackoffSeconds": 0}))))
    h.cluster.disrupt("tiny-a1-n1", "PreemptionByScheduler")
    h.reconcile()
    assert h.phase == "Restarting", h.status["message"]
    assert h.status["restarts"] == 0 and h.status["uncountedRestarts"] == 1
    assert "was disrupted (DisruptionTarget, PreemptionByScheduler)" in h.status["message"]
    assert "not counted against maxRestarts" in h.status["message"]
    h.cluster.settle()
    h.reconcile()
    assert h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"]


def test_evicted_pod_does_not_count() -> None:
    h = running(Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 0}))))
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["status"].update(
        {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    )
    h.reconcile()
    assert h.phase == "Restarting" and h.status["uncountedRestarts"] == 1 and h.status["restarts"] == 0


def test_oom_killed_counts_and_says_so() -> None:
    h = running(Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 1}))))
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=137, reason="OOMKilled")
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 1
    cond = h.condition("Restarting")
    assert "tiny-a1-n0 was OOMKilled (exit code 137)" in cond["message"]
    assert "resources.limits.memory" in cond["message"] and "restart 1 of 1" in cond["message"]


def test_the_pod_that_failed_first_decides() -> None:
    """Node 1 was preempted; node 0's torchrun then lost its peer and exited 1. The preemption is
    the cause, whatever order the pods are listed in."""
    h = running(Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 0}))))
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1, reason="Error", finished="2026-01-01T00:00:09Z")
    h.cluster.disrupt("tiny-a1-n1", "PreemptionByScheduler", at="2026-01-01T00:00:05Z")
    h.reconcile()
    assert h.phase == "Restarting" and "tiny-a1-n1 was disrupted" in h.status["message"]
    h2 = running(Harness(job_body(two_nodes(**{"runPolicy.maxRestarts": 0}))))
    h2.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1, reason="Error", finished="2026-01-01T00:00:01Z")
    h2.cluster.disrupt("tiny-a1-n1", "PreemptionByScheduler", at="2026-01-01T00:00:05Z")
    h2.reconcile()
    assert h2.phase == "Failed" and "tiny-a1-n0 failed (exit code 1)" in h2.status["message"]


def test_rules_in_order_first_match_wins() -> None:
    rules = [
        {"name": "bad-config", "action": "FailJob", "onExitCodes": {"values": [3]}},
        {"name": "flaky-nic", "action": "RestartJobIgnore", "onExitCodes": {"operator": "In", "values": [3, 42]}},
        {"action": "FailJob", "onReasons": ["PreemptionByScheduler"]},
    ]
    policy = {"runPolicy.failurePolicy": {"rules": rules}, "runPolicy.restartBackoffSeconds": 0}
    h = running(Harness(job_body(two_nodes(**policy))))
    h.cluster.set_phase("tiny-a1-n1", "Failed", exit_code=42, message="NCCL timeout")
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 0 and h.status["uncountedRestarts"] == 1
    assert "failurePolicy rule 2 (flaky-nic): RestartJobIgnore" in h.status["message"]
    h.cluster.settle()
    running(h)
    h.cluster.set_phase("tiny-a2-n0", "Failed", exit_code=3, message="error: spec.data: no such file")
    h.reconcile()
    assert h.phase == "Failed" and h.condition("Failed")["reason"] == "FailedByPolicy"
    assert "failurePolicy rule 1 (bad-config): FailJob" in h.status["message"]
    h3 = running(Harness(job_body(two_nodes(**policy))))
    h3.cluster.disrupt("tiny-a1-n0", "PreemptionByScheduler")
    h3.reconcile()
    assert h3.phase == "Failed" and "failurePolicy rule 3: FailJob" in h3.status["message"]


def test_not_in_exit_codes() -> None:
    rules = [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0, 137, 143]}}]
    h = running(Harness(job_body(two_nodes(**{"runPolicy.failurePolicy": {"rules": rules}}))))
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=143)
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 1  # no rule: the default counts
    h.cluster.settle()
    h.advance(60)
    running(h)
    h.cluster.set_phase("tiny-a2-n1", "Failed", exit_code=2)
    h.reconcile()
    assert h.phase == "Failed" and h.condition("Failed")["reason"] == "FailedByPolicy"


def test_deleted_pod_of_a_pending_gang_restarts_it_without_spending_a_restart() -> None:
    """Issue 27 item 7: `kubectl delete pod` was "failed (no exit code)" and spent a restart.
    Nothing was wrong with the job: it restarts uncounted, unless a rule on PodDeleted says."""
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 0 and h.status["uncountedRestarts"] == 1
    assert "pod tiny-a1-n0 was deleted while it ran" in h.status["message"], h.status
    rule = {"runPolicy.failurePolicy": {"rules": [{"action": "FailJob", "onReasons": ["PodDeleted"]}]}}
    h = Harness(job_body(two_nodes(**rule)))
    h.reconcile()
    h.cluster.objects[("Pod", "default", "tiny-a1-n0")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    h.reconcile()
    assert h.phase == "Failed" and h.condition("Failed")["reason"] == "FailedByPolicy"


def test_a_pod_killed_by_a_signal_says_so_not_its_last_log_line() -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0})))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=137, message="12:00:01 [rank 0] INFO step 40/100 loss 2.1")
    h.reconcile()
    assert "pod tiny-a1-n0 was killed by SIGKILL (exit code 137); its last log line: 12:00:01" in h.status["message"]


# --------------------------------------------------------------------------- time and scheduling


def test_deadline_counts_running_time_only() -> None:
    h = running(Harness(job_body(two_nodes(**{"runPolicy.activeDeadlineSeconds": 600}))))
    h.advance(300)
    h.body["spec"].setdefault("runPolicy", {})["suspend"] = True
    h.reconcile()
    h.cluster.settle()
    h.advance(7200)  # two hours suspended
    h.body["spec"]["runPolicy"]["suspend"] = False
    h.reconcile()
    assert h.phase == "Pending" and h.status["suspendedSeconds"] == 7200
    running(h)
    h.advance(290)
    h.reconcile()
    assert h.phase == "Running", "590 s of running time are within the 600 s deadline"
    h.advance(11)
    h.reconcile()
    assert h.phase == "Failed" and h.condition("Failed")["reason"] == "DeadlineExceeded"


def test_resume_waiting_for_old_pods_does_not_count_the_wait_twice() -> None:
    h = running(Harness(job_body(two_nodes(**{"runPolicy.activeDeadlineSeconds": 600}))))
    h.body["spec"].setdefault("runPolicy", {})["suspend"] = True
    h.reconcile()
    h.advance(1000)
    h.body["spec"]["runPolicy"]["suspend"] = False
    h.reconcile()  # old pods still terminating: the resume waits
    h.reconcile()
    assert h.phase == "Suspended"
    h.advance(5)
    h.cluster.settle()
    h.reconcile()
    assert h.phase == "Pending" and h.status["suspendedSeconds"] == 1005


@pytest.mark.parametrize("action", ["FailJob", "Suspend"])
def test_scheduling_timeout_action(action: str) -> None:
    h = Harness(job_body(two_nodes(**{"runPolicy.schedulingTimeoutSeconds": 120,
                                       "runPolicy.schedulingTimeoutAction": action})))  # fmt: skip
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Running")
    h.advance(119)
    h.reconcile()
    assert h.phase == "Pending"
    h.advance(2)
    h.reconcile()
    assert h.condition("Unschedulable")["status"] == "True"
    assert all(p["metadata"].get("deletionTimestamp") for p in h.cluster.pods())
    if action == "FailJob":
        assert h.phase == "Failed" and h.condition("Failed")["reason"] == "SchedulingTimeout"
        return
    assert h.phase == "Suspended" and h.condition("Suspended")["reason"] == "SchedulingTimeout"
    assert h.body["spec"]["runPolicy"]["suspend"] is True, "the operator set spec.runPolicy.suspend"
    assert "unset it to try again" in h.status["message"]
    h.cluster.settle()
    h.reconcile()
    assert h.phase == "Suspended" and h.pod_names() == []
    h.body["spec"]["runPolicy"]["suspend"] = False
    h.reconcile()
    assert h.phase == "Pending" and h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"]


def test_success_takes_the_final_progress_from_rank_0s_termination_message() -> None:
    """The last scrape comes before the last steps: the job's final status comes from the summary
    rank 0 leaves as its termination message (src/pretrain/termination.py)."""
    import json

    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    done = {"pretrainDone": {"step": 200, "totalSteps": 200, "trainLoss": 2.21734, "checkpointStep": 200,
                             "checkpointTime": "2026-11-29T08:41:27Z"}}  # fmt: skip
    h.cluster.set_phase("tiny-a1-n0", "Succeeded", 0, json.dumps(done))
    h.cluster.set_phase("tiny-a1-n1", "Succeeded", 0, "")
    h.reconcile()
    assert h.phase == "Succeeded"
    assert h.status["progress"] == {"step": 200, "totalSteps": 200, "percent": 100.0, "etaSeconds": 0, "loss": 2.2173}
    assert h.status["lastCheckpoint"] == {"step": 200, "time": "2026-11-29T08:41:27Z",
                                          "uri": "s3://bucket/ck/step-00000200"}  # fmt: skip
    running = h.condition("Running")
    assert running is not None and running["status"] == "False" and running["reason"] == "Completed"


@pytest.mark.parametrize(
    "message",
    ["", "error: something", '{"pretrainDone": {"step": "200"}}', '{"pretrainDone": {"step": -1, "totalSteps": 1e99}}',
     '{"pretrainDone": 5}', "{" + "x" * 5000],
)  # fmt: skip
def test_a_success_without_a_usable_summary_keeps_the_scraped_progress(message: str) -> None:
    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Succeeded", 0, message)
    h.cluster.set_phase("tiny-a1-n1", "Succeeded", 0, "")
    h.reconcile()
    assert h.phase == "Succeeded" and "progress" not in h.status and "lastCheckpoint" not in h.status


def test_a_job_without_checkpoint_storage_is_warned_and_says_a_restart_starts_over() -> None:
    """Issue 27 item 5: without checkpoint.uri the checkpoints live in the pod's emptyDir; attempt
    2 started at step 1 while the status said "resuming from the latest checkpoint"."""
    h = Harness(job_body({"runPolicy.restartBackoffSeconds": 0}))
    h.reconcile()
    assert "NoCheckpointStorage" in h.events()
    warning = next(e for _, e in h.cluster.events if e.reason == "NoCheckpointStorage")
    assert warning.type == "Warning" and "spec.checkpoint.uri is not set" in warning.message
    h.run_all()
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n0", "Failed", exit_code=1, message="boom")
    h.reconcile()
    h.cluster.settle()
    h.reconcile()
    assert h.status["attempt"] == 2
    assert "starting from step 0: checkpoint.uri is not set" in h.status["message"], h.status
    assert "resuming" not in h.status["message"]
    with_storage = Harness(job_body(two_nodes()))
    with_storage.reconcile()
    assert "NoCheckpointStorage" not in with_storage.events()


def test_the_data_is_prepared_by_a_job_before_the_first_gang() -> None:
    """Issue 28 item 1: with data.prepare, an Indexed Job the PretrainJob owns runs first (phase
    Preparing, workers done in status.preparation); only once it completed is the gang created,
    and the Job deleted."""
    h = Harness(job_body({"data.prepare": {"workers": 3, "backoffLimitPerIndex": 2}, "data.cacheUri": "s3://b/cache"}))
    h.reconcile()
    assert (h.phase, h.status["reason"]) == ("Preparing", "Preparing") and h.pod_names() == []
    prep = h.cluster.objects[("Job", "default", "tiny-prepare")]
    assert prep["spec"]["completionMode"] == "Indexed" and prep["spec"]["completions"] == 3
    assert prep["spec"]["backoffLimitPerIndex"] == 2 and prep["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny"
    c = prep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["pretrain", "data", "prepare", "/etc/pretrain/job.json", "--index=$(JOB_COMPLETION_INDEX)",
                            "--count=3", "--output=/tmp/data"]  # fmt: skip
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["resources"]["requests"]["cpu"] == "1"
    h.cluster.set_job_status("tiny-prepare", succeeded=2)
    template = prep["spec"]["template"]
    for index, tokens in ((0, 1000), (2, 2500)):  # what the Job controller's pods are, once done
        name = f"tiny-prepare-{index}-x"
        h.cluster.create({"kind": "Pod", "metadata": {
            "name": name, "namespace": "default", "labels": template["metadata"]["labels"],
            "ownerReferences": [{"kind": "Job", "name": "tiny-prepare", "uid": "uid-tiny-prepare", "controller": True}]},
            "spec": template["spec"]})  # fmt: skip
        summary = f'{{"pretrainPrepared": {{"units": 2, "documents": 10, "tokens": {tokens}}}}}'
        h.cluster.set_phase(name, "Succeeded", exit_code=0, message=summary)
    h.reconcile()
    assert {k: v for k, v in h.status["preparation"].items() if k != "key"} == {
        "workers": 3, "completed": 2, "units": 4, "documents": 20, "tokens": 3500}  # fmt: skip
    assert "2 of 3 worker(s) done, 3,500 tokens" in h.status["message"]
    assert sorted(p["metadata"]["name"] for p in h.cluster.pods()) == ["tiny-prepare-0-x", "tiny-prepare-2-x"], \
        "the Job's pods are the Job's: not taken, not deleted"  # fmt: skip
    h.cluster.set_job_status("tiny-prepare", complete=True, succeeded=3)
    h.reconcile()
    assert h.status["preparation"]["done"] is True and h.phase == "Pending"
    assert [n for n in h.pod_names() if "prepare" not in n] == ["tiny-a1-n0"]
    assert ("Job", "default", "tiny-prepare") not in h.cluster.objects, "the completed Job is deleted"
    assert "Prepared" in h.events()
    h.run_all()
    h.reconcile()
    assert h.phase == "Running"


def test_a_failed_preparation_fails_the_job_with_the_workers_named() -> None:
    h = Harness(job_body({"data.prepare": {"workers": 3}, "data.cacheUri": "s3://b/cache"}))
    h.reconcile()
    h.cluster.set_job_status("tiny-prepare", failed=True, succeeded=2, failed_indexes="1")
    h.reconcile()
    assert (h.phase, h.status["reason"]) == ("Failed", "PreparationFailed") and h.pod_names() == []
    assert "failed workers 1" in h.status["message"] and "kubectl logs -l job-name=tiny-prepare" in h.status["message"]
    assert h.status["preparation"]["failedIndexes"] == "1"


def test_suspending_while_preparing_deletes_the_job_and_resuming_makes_it_again() -> None:
    h = Harness(job_body({"data.prepare": {"workers": 2}, "data.cacheUri": "s3://b/cache"}))
    h.reconcile()
    h.body["spec"].setdefault("runPolicy", {})["suspend"] = True
    h.reconcile()
    assert h.phase == "Suspended" and ("Job", "default", "tiny-prepare") not in h.cluster.objects
    h.body["spec"]["runPolicy"]["suspend"] = False
    h.reconcile()
    assert h.phase == "Preparing" and ("Job", "default", "tiny-prepare") in h.cluster.objects


def test_a_gang_whose_node_0_stopped_beating_restarts_as_stalled() -> None:
    """Issue 29 item 2, the operator's side: node 0's heartbeat (scraped into status.progress)
    older than its stall limit plus 3 minutes is a gang failure with reason Stalled, counted, and
    a failurePolicy rule can name it; a heartbeat of an earlier attempt means nothing."""
    from pretrain.timestamps import rfc3339

    def beat(h: Harness, seconds_ago: float, attempt: int, limit: int = 600) -> None:
        then = h.cluster.now - timedelta(seconds=seconds_ago)
        h.status.setdefault("progress", {})["heartbeat"] = {"time": rfc3339(then), "limitSeconds": limit,
                                                             "attempt": attempt}  # fmt: skip

    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    beat(h, 700, attempt=1)
    h.reconcile()
    assert h.phase == "Running", "within the limit and its slack"
    beat(h, 781, attempt=0)
    h.reconcile()
    assert h.phase == "Running", "an earlier attempt's heartbeat"
    beat(h, 781, attempt=1)
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 1, h.status
    assert h.status["reason"] == "GangRestart" and "pod tiny-a1-n0 stalled: no progress for 781s (stall limit 600s)" in \
        h.status["message"]  # fmt: skip
    rule = {"runPolicy.failurePolicy.rules": [{"action": "FailJob", "onReasons": ["Stalled"], "name": "hung"}],
            "runPolicy.stallTimeoutSeconds": 60}  # fmt: skip
    h = Harness(job_body(two_nodes(**rule)))
    h.reconcile()
    h.run_all()
    h.reconcile()
    beat(h, 241, attempt=1, limit=900)
    h.reconcile()
    assert (h.phase, h.status["reason"]) == ("Failed", "FailedByPolicy"), "the spec's limit wins over the trainer's"
    assert "failurePolicy rule 1 (hung): FailJob" in h.status["message"]


def test_a_pod_whose_watchdog_fired_is_a_stalled_failure() -> None:
    from pretrain.contract import stalled_message

    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    message = stalled_message("no progress on rank 1 for 31s (limit 30s, after step 3)", "Thread 0x1 (most recent...")
    h.cluster.set_phase("tiny-a1-n1", "Failed", exit_code=1, message=message)
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 1
    assert h.status["message"].startswith("pod tiny-a1-n1 stalled: Stalled: no progress on rank 1 for 31s"), h.status
    assert "Thread 0x1" not in h.status["message"], "the stacks stay in the pod's termination message"


def test_the_next_attempt_prefers_other_nodes_than_the_one_that_failed() -> None:
    """Issue 29 item 3: the node of the gang's first failed pod is kept out of the next attempts
    (a preferred anti-affinity by node name, beside the spec's own affinity) for
    failedNodeAvoidanceSeconds, in status and an event; an OOM says nothing about its node."""
    spec_affinity = {"podAffinity": {"x": 1}}
    h = Harness(job_body(two_nodes(**{"resources.affinity": spec_affinity, "runPolicy.restartBackoffSeconds": 0,
                                      "runPolicy.failedNodeAvoidanceSeconds": 600})))  # fmt: skip
    h.reconcile()
    h.run_all()
    for rank, node in ((0, "node-a"), (1, "node-b")):
        h.cluster.objects[("Pod", "default", f"tiny-a1-n{rank}")]["spec"]["nodeName"] = node
    h.reconcile()
    h.cluster.set_phase("tiny-a1-n1", "Failed", exit_code=1, message="RuntimeError: NCCL error: unhandled system error")
    h.reconcile()
    assert [n["node"] for n in h.status["avoidedNodes"]] == ["node-b"] and "NodeAvoided" in h.events()
    h.cluster.settle()
    h.reconcile()
    pod = h.cluster.objects[("Pod", "default", "tiny-a2-n0")]
    affinity = pod["spec"]["affinity"]
    assert affinity["podAffinity"] == {"x": 1}, "the spec's affinity stays"
    assert affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 100, "preference": {"matchFields": [{"key": "metadata.name", "operator": "NotIn",
                                                        "values": ["node-b"]}]}}]  # fmt: skip
    h.run_all()
    for rank in (0, 1):
        h.cluster.objects[("Pod", "default", f"tiny-a2-n{rank}")]["spec"]["nodeName"] = "node-a"
    h.reconcile()
    h.cluster.set_phase("tiny-a2-n0", "Failed", exit_code=137, message="", reason="OOMKilled")
    h.reconcile()
    assert [n["node"] for n in h.status["avoidedNodes"]] == ["node-b"], "an OOM is the job's, not node-a's"
    h.advance(601)
    h.cluster.settle()
    h.reconcile()
    assert "avoidedNodes" not in h.status, "the window passed"
    assert "affinity" not in h.cluster.objects[("Pod", "default", "tiny-a3-n0")]["spec"] or "nodeAffinity" not in \
        h.cluster.objects[("Pod", "default", "tiny-a3-n0")]["spec"]["affinity"]  # fmt: skip


def test_each_new_finding_of_the_loss_guard_is_one_warning_event() -> None:
    h = Harness(job_body(two_nodes()))
    h.reconcile()
    h.run_all()
    h.reconcile()
    h.status.setdefault("progress", {})["guard"] = {"events": 1, "lastStep": 7, "attempt": 1}
    h.reconcile()
    h.reconcile()
    assert h.events().count("LossGuard") == 1
    message = next(e for _, e in h.cluster.events if e.reason == "LossGuard")
    assert message.type == "Warning" and "found 1 bad step(s) in attempt 1, the last at step 7" in message.message
    h.status["progress"]["guard"] = {"events": 2, "lastStep": 9, "attempt": 1}
    h.reconcile()
    assert h.events().count("LossGuard") == 2
    h.status["progress"]["guard"] = {"events": 5, "lastStep": 3, "attempt": 0}
    h.reconcile()
    assert h.events().count("LossGuard") == 2, "an earlier attempt's count is not news"


def test_a_second_job_with_the_same_data_goes_straight_to_its_gang() -> None:
    """Issue 28: a job whose preparation stage completed names its data (status.preparation.key);
    a later job of the namespace with the same sources, tokenizer, packing and cacheUri runs no
    stage. Other data (here another sequence length) still gets its own."""
    from pretrain.operator.reconcile import reconcile_job

    data = {"data.prepare": {"workers": 2}, "data.cacheUri": "s3://b/cache"}
    h = Harness(job_body(data, name="first"))
    h.reconcile()
    h.cluster.set_job_status("first-prepare", complete=True, succeeded=2)
    h.reconcile()
    assert h.status["preparation"]["done"] and h.status["preparation"]["key"]
    second = h.cluster.add_job(job_body(data, name="second"))
    reconcile_job("default", "second", h.cluster, h.cluster.now)
    assert ("Job", "default", "second-prepare") not in h.cluster.objects
    assert second["status"]["preparation"]["reusedFrom"] == "first" and second["status"]["phase"] == "Pending"
    assert any(k == "Pod" and n == "second-a1-n0" for k, _, n in h.cluster.objects)
    calls = len([c for c in h.cluster.calls if c == ("list", "PretrainJob")])
    reconcile_job("default", "second", h.cluster, h.cluster.now)
    assert len([c for c in h.cluster.calls if c == ("list", "PretrainJob")]) == calls, "listed once, at its start"
    other = h.cluster.add_job(job_body({**data, "data.sequenceLength": 64}, name="other"))
    reconcile_job("default", "other", h.cluster, h.cluster.now)
    assert ("Job", "default", "other-prepare") in h.cluster.objects and other["status"]["phase"] == "Preparing"


def test_a_notready_node_ends_the_attempt_at_once() -> None:
    """Issue 29 item 3: a pod still Running in the API on a node whose Ready turned Unknown (the
    kubelet stopped posting) fails the gang at once, as a disruption (not counted); the node is
    avoided; its pods are deleted with grace 0, since no kubelet there confirms a graceful
    deletion and a Terminating pod would hold the next attempt back for good."""
    h = Harness(job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0, "runPolicy.failedNodeAvoidanceSeconds": 600,
                                      "runPolicy.badNodeConditions": ["KernelDeadlock"]})))  # fmt: skip
    h.reconcile()
    h.run_all()
    for rank, node in ((0, "node-a"), (1, "node-b")):
        h.cluster.set_node(node)
        h.cluster.objects[("Pod", "default", f"tiny-a1-n{rank}")]["spec"]["nodeName"] = node
    h.reconcile()
    assert h.phase == "Running"
    h.cluster.set_node("node-b", KernelDeadlock="False")  # a condition False is healthy
    h.reconcile()
    assert h.phase == "Running"
    h.cluster.set_node("node-b", ready="Unknown")
    h.reconcile()
    assert h.phase == "Restarting" and h.status["restarts"] == 0 and h.status["uncountedRestarts"] == 1, h.status
    assert (
        "pod tiny-a1-n1 was disrupted (NodeNotReady): node node-b is NotReady: Ready is Unknown" in h.status["message"]
    )
    assert [n["node"] for n in h.status["avoidedNodes"]] == ["node-b"]
    h.cluster.settle()  # node-a's kubelet confirms; node-b's pod was forced out
    assert h.pod_names() == [] and not h.cluster.pods(), [p["metadata"] for p in h.cluster.pods()]
    h.advance(5)
    h.reconcile()
    assert h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"], "the next attempt starts"
    # placed on node-b, back, though this view of it lags: a pod made after the fault began
    # cannot have been bound to it while it was bad, so the view is stale and nothing ends
    h.run_all()
    for rank in (0, 1):
        h.cluster.objects[("Pod", "default", f"tiny-a2-n{rank}")]["spec"]["nodeName"] = "node-b"
    h.reconcile()
    assert h.phase == "Running" and h.status["uncountedRestarts"] == 1


def test_a_bad_node_condition_ends_the_attempt_and_a_stuck_pod_is_forced() -> None:
    """A condition named in runPolicy.badNodeConditions turning True ends the attempt too; a pod
    already Terminating on a node gone NotReady (deleted before, gracefully) is forced out."""
    h = Harness(
        job_body(two_nodes(**{"runPolicy.restartBackoffSeconds": 0, "runPolicy.badNodeConditions": ["KernelDeadlock"]}))
    )
    h.reconcile()
    h.run_all()
    for rank, node in ((0, "node-a"), (1, "node-b")):
        h.cluster.set_node(node)
        h.cluster.objects[("Pod", "default", f"tiny-a1-n{rank}")]["spec"]["nodeName"] = node
    h.cluster.set_node("node-a", KernelDeadlock="True")
    h.reconcile()
    assert h.phase == "Restarting" and "node node-a has condition KernelDeadlock" in h.status["message"], h.status
    h.cluster.set_node("node-a", KernelDeadlock="False")
    h.cluster.set_node("node-b", ready="False")  # gone bad after its pod was deleted gracefully
    h.cluster.settle()
    assert [p["metadata"]["name"] for p in h.cluster.pods()] == ["tiny-a1-n1"], "Terminating on a NotReady node"
    h.reconcile()
    assert not h.cluster.pods(), "forced"
    h.reconcile()
    assert h.pod_names() == ["tiny-a2-n0", "tiny-a2-n1"]


def test_volcano_gets_a_pod_group_per_attempt() -> None:
    """Issue 29 item 4: with schedulerName volcano each attempt has a PodGroup (minMember = its
    nodes, the job's Volcano Queue and priority class) created before its pods, which name it in
    scheduling.k8s.io/group-name; the next attempt's replaces it. No Kueue labels.

    Volcano's CRD cannot be fetched here, nor a copy committed; the fields set were checked
    against its schema as read (volcano-sh/volcano config/crd/volcano/bases/
    scheduling.volcano.sh_podgroups.yaml, commit 096235e1): spec.minMember an int32,
    spec.queue and spec.priorityClassName strings, all optional."""
    h = Harness(job_body(two_nodes(**{"resources.schedulerName": "volcano", "resources.queueName": "research",
                                      "resources.priorityClassName": "training", "runPolicy.restartBackoffSeconds": 0})))  # fmt: skip
    h.reconcile()
    kinds = [k for k, _, _ in h.cluster.objects]
    assert kinds.index("PodGroup") < kinds.index("Pod"), "the group before its pods"
    group = h.cluster.objects[("PodGroup", "default", "tiny-a1")]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {"minMember": 2, "queue": "research", "priorityClassName": "training"}
    assert group["metadata"]["ownerReferences"][0]["controller"] is True
    pod = h.cluster.objects[("Pod", "default", "tiny-a1-n0")]
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "tiny-a1"
    assert pod["spec"]["schedulerName"] == "volcano" and "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
    h.run_all()
    h.cluster.set_phase("tiny-a1-n1", "Failed", exit_code=1)
    h.reconcile()
    h.cluster.settle()
    h.reconcile()
    assert [n for k, _, n in h.cluster.objects if k == "PodGroup"] == ["tiny-a2"]
    assert h.cluster.objects[("Pod", "default", "tiny-a2-n0")]["metadata"]["annotations"][
        "scheduling.k8s.io/group-name"] == "tiny-a2"  # fmt: skip
