"""`pretrain.client` and the CLI verbs over it (issue 31 items 1-2), against the API emulator
(the whole path with the real operator and trainer is in tests/test_node_system.py): what is
sent, what the API refuses, a missing job, suspend and resume, the status as a person reads
it, wait and its timeout, the kubeconfig context's namespace, and rank 0's log followed through
the stand-in kubelet until its container ends."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from click.testing import CliRunner, Result

from pretrain.api.spec import GROUP, PLURAL, VERSION
from pretrain.cli import main
from pretrain.client import ClientError, PretrainClient
from tests.kubeapi.harness import wait_for
from tests.kubeapi.server import ApiServer
from tests.kubelet import Kubelet

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "tiny-cpu.yaml")


def cli(api: ApiServer, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"KUBECONFIG": str(api.kubeconfig)})


def custom(api: ApiServer) -> Any:
    return kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig)))


def set_status(api: ApiServer, name: str, status: dict[str, Any], namespace: str = "default") -> None:
    """What the operator writes (the status subresource)."""
    custom(api).patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})


def test_submit_status_suspend_wait_delete_from_the_terminal(api: ApiServer) -> None:
    r = cli(api, "submit", EXAMPLE, "--set", "training.maxSteps=7")
    assert r.exit_code == 0 and r.output == "pretrainjob.pretrain.io/tiny-cpu created\n", r.output
    sent = custom(api).get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tiny-cpu")
    assert sent["spec"]["training"]["maxSteps"] == 7
    bad = cli(api, "submit", EXAMPLE, "--set", "training.maxSteps=-1")
    assert bad.exit_code == 1 and len(bad.output.splitlines()) == 1 and "training.maxSteps" in bad.output, bad.output
    again = cli(api, "submit", EXAMPLE)
    assert again.exit_code == 1 and again.output.startswith("error: pretrainjob default/tiny-cpu not created: ")
    assert "already exists" in again.output and len(again.output.splitlines()) == 1, again.output
    missing = cli(api, "status", "nope")
    assert (missing.exit_code, missing.output) == (1, 'error: pretrainjob "nope" not found in namespace default\n')
    assert cli(api, "status", "tiny-cpu").output.startswith("tiny-cpu: no phase yet\n")
    assert cli(api, "suspend", "tiny-cpu").output == "pretrainjob.pretrain.io/tiny-cpu suspended\n"
    spec = custom(api).get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tiny-cpu")["spec"]
    assert spec["runPolicy"]["suspend"] is True and spec["training"]["maxSteps"] == 7
    assert cli(api, "resume", "tiny-cpu").exit_code == 0
    assert PretrainClient(api_client=custom(api).api_client).get("tiny-cpu")["spec"]["runPolicy"]["suspend"] is False
    set_status(api, "tiny-cpu", {"phase": "Running", "attempt": 1, "restarts": 0, "nodes": 2, "progress": {
        "step": 3, "totalSteps": 7, "loss": 2.5, "tokensPerSecond": 1200.0},
        "lastCheckpoint": {"step": 2, "uri": "s3://b/tiny-cpu/step-00000002"}})  # fmt: skip
    shown = cli(api, "status", "tiny-cpu").output.splitlines()
    assert shown == ["tiny-cpu: Running", "  attempt 1, restarts 0, nodes 2", "  step 3/7, loss 2.5, tokens/s 1200",
                     "  last checkpoint: step 2 at s3://b/tiny-cpu/step-00000002"], shown  # fmt: skip
    table = CliRunner().invoke(main, ["top", "--once"], env={"KUBECONFIG": str(api.kubeconfig), "COLUMNS": "160"})
    assert len(table.output.splitlines()) == 2, repr(table.output)
    header, row = table.output.splitlines()
    assert header.split() == ["NAME", "PHASE", "STEP", "LOSS", "TOKENS/S", "MFU", "ETA", "RESTARTS", "GOODPUT", "AGE"]
    assert row.split()[:9] == ["tiny-cpu", "Running", "3/7", "2.5000", "1,200", "-", "-", "0", "-"], row
    late = cli(api, "wait", "tiny-cpu", "--timeout", "1.5")
    assert late.exit_code == 1 and "is Running after 1.5s, not Succeeded or Failed" in late.output, late.output
    threading.Timer(1.0, set_status, (api, "tiny-cpu", {"phase": "Succeeded", "reason": "Completed"})).start()
    done = cli(api, "wait", "tiny-cpu", "--timeout", "30")
    assert done.exit_code == 0 and done.output.startswith("tiny-cpu: Succeeded (Completed)\n"), done.output
    no_history = cli(api, "report", "--job", "tiny-cpu")
    assert no_history.output == "error: pretrainjob tiny-cpu has no checkpoint.uri: its history stayed in its pods\n"
    assert cli(api, "delete", "tiny-cpu").output == 'pretrainjob.pretrain.io "tiny-cpu" deleted\n'
    gone = cli(api, "delete", "tiny-cpu")
    assert gone.exit_code == 1 and "not found" in gone.output


def test_a_failed_job_fails_wait_and_watch_sees_each_change(api: ApiServer) -> None:
    c = PretrainClient(api_client=custom(api).api_client)
    name = c.submit(EXAMPLE)
    seen: list[str | None] = []

    def follow() -> None:
        seen.extend(s.get("phase") for s in c.watch(name, timeout=30))

    watcher = threading.Thread(target=follow)
    watcher.start()
    for phase in ("Pending", "Running", "Restarting", "Running"):
        wait_for(lambda: len(seen) >= 1, 10, "the watch's first status")
        set_status(api, name, {"phase": phase})
        time.sleep(0.3)
    set_status(api, name, {"phase": "Failed", "reason": "RestartsExhausted", "message": "pod x failed"})
    watcher.join(30)
    assert seen == [None, "Pending", "Running", "Restarting", "Running", "Failed"], seen
    with pytest.raises(ClientError, match=r"^pretrainjob tiny-cpu failed: RestartsExhausted: pod x failed$"):
        c.wait(name, timeout=5)


def test_the_context_namespace_is_the_default(api: ApiServer, tmp_path: Path) -> None:
    """As kubectl: the current context's namespace, unless -n says otherwise."""
    kubernetes.client.CoreV1Api(custom(api).api_client).create_namespace({"metadata": {"name": "research"}})
    config = yaml.safe_load(api.kubeconfig.read_text())
    for ctx in config["contexts"]:
        ctx["context"]["namespace"] = "research"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    r = CliRunner().invoke(main, ["submit", EXAMPLE], env={"KUBECONFIG": str(kubeconfig)})
    assert r.exit_code == 0, r.output
    assert [o["metadata"]["name"] for o in PretrainClient(kubeconfig=str(kubeconfig)).list()] == ["tiny-cpu"]
    assert PretrainClient("default", kubeconfig=str(kubeconfig)).list() == []
    wrong = CliRunner().invoke(main, ["status", "tiny-cpu", "--context", "nope"], env={"KUBECONFIG": str(kubeconfig)})
    assert wrong.exit_code == 1 and wrong.output == "error: context 'nope' is not in the kubeconfig\n"


@pytest.mark.slow
def test_logs_follow_rank_0_of_the_current_attempt(api: ApiServer, tmp_path: Path) -> None:
    """The pod of the attempt in status (`<job>-a<attempt>-n<rank>`), read through pods/log from
    the stand-in kubelet; -f ends when its container does."""
    import sys

    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    try:
        c = PretrainClient(api_client=custom(api).api_client)
        name = c.submit(EXAMPLE)
        none_yet = cli(api, "logs", name)
        assert none_yet.exit_code == 1 and "has no pods yet" in none_yet.output
        script = "import time\nfor i in range(5):\n    print('step', i, flush=True)\n    time.sleep(0.4)\n"
        kubernetes.client.CoreV1Api(custom(api).api_client).create_namespaced_pod("default", {
            "metadata": {"name": f"{name}-a2-n0"}, "spec": {"restartPolicy": "Never", "containers": [{
                "name": "trainer", "image": "python", "command": [sys.executable, "-u", "-c", script]}]}})  # fmt: skip
        set_status(api, name, {"phase": "Running", "attempt": 2})
        wait_for(
            lambda: c.core.read_namespaced_pod(f"{name}-a2-n0", "default").status.phase == "Running", 20, "Running"
        )
        followed = cli(api, "logs", name, "-f")
        assert followed.exit_code == 0 and followed.output.splitlines() == [f"step {i}" for i in range(5)], (
            followed.output
        )
        assert cli(api, "logs", name, "--tail", "1").output == "step 4\n"
        other = cli(api, "logs", name, "--rank", "1")
        assert other.exit_code == 1 and other.output.startswith(f"error: pod {name}-a2-n1 of pretrainjob {name}: ")
        assert "not found" in other.output and len(other.output.splitlines()) == 1, other.output
    finally:
        node.stop()


def test_top_rows_say_what_the_status_says() -> None:
    from datetime import datetime

    from pretrain.client_top import top_row

    now = datetime(2026, 12, 2, 12, 0)
    job = {"metadata": {"name": "big", "creationTimestamp": "2026-11-30T09:30:00Z"}, "status": {
        "phase": "Running", "restarts": 2, "uncountedRestarts": 1, "goodput": {"seconds": {"ratio": 0.874, "training": 9e4}},
        "progress": {"step": 12000, "totalSteps": 100000, "loss": 2.71828, "tokensPerSecond": 1234567.8,
                     "mfu": 0.4123, "etaSeconds": 3 * 86400 + 7200}}}  # fmt: skip
    assert top_row(job, now) == (
        "big",
        "Running",
        "12000/100000",
        "2.7183",
        "1,234,568",
        "41.2%",
        "3d2h",
        "2 (+1)",
        "87%",
        "2d2h",
    )
    first = {**job, "status": {**job["status"], "goodput": {"seconds": {"ratio": 0.0, "training": 0.0}}}}
    assert top_row(first, now)[8] == "-", "closed totals of a first attempt still running say nothing yet"
    fresh = {"metadata": {"name": "new", "creationTimestamp": "2026-12-02T11:59:15Z"}}
    assert top_row(fresh, now) == ("new", "-", "-", "-", "-", "-", "-", "0", "-", "45s")
