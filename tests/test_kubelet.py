"""The stand-in node as strict as a kubelet where the operator and users lean on it (issue 27):
a pod goes through ContainerCreating; `kubectl logs` (plain, --tail, -f) reaches the node's
kubelet through the API's `pods/log`, and says why a container that has not started has no log;
node 0's DNS name resolves only through a headless Service that selects the pod."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.kubeapi.harness import Kubectl, wait_for
from tests.kubeapi.server import ApiServer
from tests.kubelet import Kubelet


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "t"}},
            "spec": {"restartPolicy": "Never", **spec, "containers": [{
                "name": "main", "image": "python", "command": [sys.executable, "-u", "-c", script],
                "volumeMounts": [], **spec.pop("container", {})}], "volumes": []}}  # fmt: skip


def test_a_pod_is_container_creating_before_it_runs_and_kubectl_logs_reach_its_kubelet(
    api: ApiServer, tmp_path: Path
) -> None:
    import json

    node = Kubelet(api.kubeconfig, tmp_path / "node", create_seconds=1.5).start()
    kubectl = Kubectl(api)
    try:
        script = "import time\nfor i in range(6):\n    print('line', i, flush=True)\n    time.sleep(0.5)\n"
        kubectl("apply", "-f", "-", stdin=json.dumps(pod("talker", script)))
        creating = wait_for(lambda: next((cs["state"]["waiting"] for p in api.objects("pods")
                                          for cs in p["status"].get("containerStatuses") or []
                                          if "waiting" in cs["state"]), None), 10, "ContainerCreating")  # fmt: skip
        assert creating == {"reason": "ContainerCreating"}
        early = kubectl("logs", "talker", check=False)
        assert early.returncode != 0 and 'container "main" in pod "talker" is waiting to start: ContainerCreating' in (
            early.stderr
        ), early.stderr
        wait_for(lambda: api.objects("pods")[0]["status"].get("phase") == "Running", 10, "Running")
        followed = kubectl("logs", "-f", "talker", timeout=30)  # ends when the container does
        assert followed.stdout.splitlines() == [f"line {i}" for i in range(6)]
        wait_for(lambda: api.objects("pods")[0]["status"]["phase"] == "Succeeded", 5, "the pod's end reported")
        assert kubectl("logs", "talker", "--tail", "2").stdout.splitlines() == ["line 4", "line 5"]
        assert kubectl("logs", "talker", "--limit-bytes", "6").stdout == "line 0"
        wrong = kubectl("logs", "talker", "-c", "other", check=False)
        assert "container other is not valid for pod talker" in wrong.stderr
    finally:
        node.stop()


def test_kubectl_logs_of_a_pod_no_node_took(api: ApiServer, tmp_path: Path) -> None:
    import json

    node = Kubelet(api.kubeconfig, tmp_path / "node", capacity=0).start()
    kubectl = Kubectl(api)
    try:
        kubectl("apply", "-f", "-", stdin=json.dumps(pod("homeless", "print(1)")))
        wait_for(lambda: api.objects("pods")[0]["status"].get("conditions"), 10, "Unschedulable")
        out = kubectl("logs", "homeless", check=False)
        assert out.returncode != 0 and "pod homeless does not have a host assigned" in out.stderr, out.stderr
    finally:
        node.stop()


def test_node_0s_name_resolves_only_through_a_headless_service_that_selects_it(api: ApiServer, tmp_path: Path) -> None:
    """The trainer reaches node 0 as <pod>.<service>.<namespace>.svc. The stand-in once took
    the name's first label as a pod name, so a job without its Service, or with a Service that
    does not select its pods, would have rendezvoused here and not in a cluster."""
    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    try:
        manifests = [pod("j-n0", "import time; time.sleep(30)", hostname="j-n0", subdomain="j"),
                     pod("j-n1", "import time; time.sleep(30)", hostname="j-n1", subdomain="j")]  # fmt: skip
        for m in manifests:
            node.core.create_namespaced_pod("default", m)
        wait_for(lambda: all(p["status"].get("phase") == "Running" for p in api.objects("pods")), 10, "running")
        name = "j-n0.j.default.svc"
        assert node.resolve(name) == name, "no Service: no record"
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"},
               "spec": {"clusterIP": "None", "selector": {"app": "other"}, "ports": [{"port": 29500}]}}  # fmt: skip
        node.core.create_namespaced_service("default", svc)
        assert node.resolve(name) == name, "a Service that does not select the pod"
        node.core.patch_namespaced_service("j", "default", {"spec": {"selector": {"app": "t"}}})
        ip = node.resolve(name)
        assert ip == node.ip_of("j-n0") and ip.startswith("127."), ip
        assert node.resolve(f"{name}.cluster.local") == ip
        assert node.resolve("j-n0.j.elsewhere.svc") == "j-n0.j.elsewhere.svc", "another namespace"
        assert node.resolve("j-n9.j.default.svc") == "j-n9.j.default.svc", "no such hostname"
        assert node.resolve(name) != node.resolve("j-n1.j.default.svc"), "each pod its own address"
    finally:
        node.stop()


def test_a_followed_log_stops_when_the_client_goes(api: ApiServer, tmp_path: Path) -> None:
    """`kubectl logs -f` interrupted (Ctrl-C) while the container runs: the kubelet's stream
    ends with the client instead of holding a thread for the container's life."""
    import json
    import subprocess

    from tests.kubeapi.harness import KUBECTL

    node = Kubelet(api.kubeconfig, tmp_path / "node").start()
    try:
        node.core.create_namespaced_pod("default", pod("long", "import time\nwhile True:\n    print('x')\n"
                                                       "    time.sleep(0.2)\n"))  # fmt: skip
        wait_for(lambda: api.objects("pods")[0]["status"].get("phase") == "Running", 10, "Running")
        env = {"KUBECONFIG": str(api.kubeconfig), "PATH": "/usr/bin:/bin"}
        follower = subprocess.Popen([str(KUBECTL), "logs", "-f", "long"], env=env, stdout=subprocess.PIPE)
        assert follower.stdout is not None and follower.stdout.readline() == b"x\n"
        before = threading.active_count()
        follower.kill()
        follower.wait(10)
        deadline = time.monotonic() + 10
        while threading.active_count() >= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert threading.active_count() < before, "the stream's thread ended with its client"
        assert json.dumps(api.objects("pods")[0]["status"]["phase"]) == '"Running"'
    finally:
        node.stop()


@pytest.mark.slow
def test_a_lost_node_turns_notready_and_its_pods_hang_in_terminating(api: ApiServer, tmp_path: Path) -> None:
    """The stand-ins as a cluster behaves when a node is lost: the kubelet's heartbeat Lease
    stops, the node lifecycle controller turns Ready Unknown and the pod's Ready False (its phase
    stays Running), a graceful deletion hangs in Terminating (no kubelet confirms it), a forced
    one (grace 0) removes the pod at once; the node back, the kubelet kills the container of the
    pod deleted meanwhile and reports Ready again."""
    from tests.nodecontroller import NodeController

    node = Kubelet(api.kubeconfig, tmp_path / "node", heartbeat_seconds=0.3).start()
    controller = NodeController(api.kubeconfig, grace_seconds=3).start()
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig)))
    ready = lambda: next(c.status for c in core.read_node(node.node).status.conditions if c.type == "Ready")  # noqa: E731
    try:
        for name in ("p1", "p2"):
            core.create_namespaced_pod(
                "default", pod(name, "import time\ntime.sleep(600)\n", terminationGracePeriodSeconds=30)
            )
        wait_for(lambda: all(core.read_namespaced_pod(n, "default").status.phase == "Running" for n in ("p1", "p2")),
                 20, "both running")  # fmt: skip
        time.sleep(4)
        assert ready() == "True", "heartbeats keep it Ready"
        node.die()
        wait_for(lambda: ready() == "Unknown", 10, "Ready Unknown")
        p1 = core.read_namespaced_pod("p1", "default")
        assert p1.status.phase == "Running" and {c.type: c.status for c in p1.status.conditions}["Ready"] == "False"
        core.delete_namespaced_pod("p1", "default")
        time.sleep(2)
        assert core.read_namespaced_pod("p1", "default").metadata.deletion_timestamp, "still Terminating"
        core.delete_namespaced_pod("p2", "default", grace_period_seconds=0)
        assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["p1"]
        frozen = node.processes["p2"].proc
        assert frozen.poll() is None, "its process lives on, frozen, on the lost node"
        node.revive()
        wait_for(lambda: frozen.poll() is not None, 10, "the deleted pod's container killed")
        wait_for(lambda: not core.list_namespaced_pod("default").items, 20, "p1's deletion confirmed")
        assert ready() == "True"
    finally:
        controller.stop()
        node.stop()
