"""A stand-in for kube-controller-manager's node lifecycle controller, through the API as the
real one works: it reads each node's heartbeat Lease (kube-node-lease/<node>, renewed by the
kubelet, tests/kubelet.py) and, once a lease has not been renewed for `grace_seconds`
(node-monitor-grace-period: 40 s in a cluster, 50 s since v1.32; tests shorten it), sets the
node's Ready condition Unknown with the controller's reason and message, and turns the node's
pods' Ready condition False (MarkPodsNotReady). Their phase stays Running, as in a cluster.

Not done (not relied on): the unreachable and not-ready taints and the taint manager's evictions
after their 300 s tolerations, zone disruption states, rate limits.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kubelet import NODE_LEASE_NAMESPACE
from tests.loops import sync_until

#: The node lifecycle controller's words on a node whose kubelet went quiet.
UNKNOWN = {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
           "message": "Kubelet stopped posting node status."}  # fmt: skip


@dataclass
class NodeController:
    kubeconfig: Path
    grace_seconds: float = 3.0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        import kubernetes

        self.k = kubernetes
        client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.leases = kubernetes.client.CoordinationV1Api(client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=sync_until, args=(self._stop, self.sync, self.errors, "node controller"),
                                        daemon=True, name="node-controller")  # fmt: skip

    def start(self) -> NodeController:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sync(self) -> None:
        try:
            leases = self.leases.list_namespaced_lease(NODE_LEASE_NAMESPACE).items
        except self.k.client.ApiException as e:
            if e.status == 404:  # no kubelet has renewed a lease yet
                return
            raise
        now = datetime.now(UTC)
        for lease in leases:
            if self._stale(lease, now):
                self._mark_unknown(lease.metadata.name)

    def _stale(self, lease: Any, now: datetime) -> bool:
        renewed: datetime | None = lease.spec.renew_time  # a MicroTime, parsed by the client
        return renewed is not None and (now - renewed).total_seconds() > self.grace_seconds

    def _mark_unknown(self, node: str) -> None:
        obj = self.core.read_node(node)
        ready = next((c for c in obj.status.conditions or [] if c.type == "Ready"), None)
        if ready is not None and ready.status == "Unknown":
            return
        if not self._stale(self.leases.read_namespaced_lease(node, NODE_LEASE_NAMESPACE), datetime.now(UTC)):
            return  # renewed since the list: the kubelet is back
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.core.patch_node_status(node, {"status": {"conditions": [{**UNKNOWN, "lastTransitionTime": stamp}]}})
        for pod in self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items:
            with contextlib.suppress(self.k.client.ApiException):
                self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": {
                    "conditions": [{"type": "Ready", "status": "False", "reason": "NodeNotReady",
                                    "lastTransitionTime": stamp}]}})  # fmt: skip
