"""`pretrain render` (what a job would create) and `pretrain operator` (run the controller)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from pretrain.api.validation import load_job
from pretrain.clitools import friendly_errors, set_option
from pretrain.operator.leader import LeaderElector, Timing


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--namespace", default=None, help="Namespace (default: metadata.namespace or default).")
@set_option
@friendly_errors
def render(file: Path, namespace: str | None, overrides: tuple[str, ...]) -> None:
    """Print the manifests the operator creates for a new job (Service, ConfigMap, the data
    preparation Job when data.prepare is set, then the first attempt's pods)."""
    import yaml

    from pretrain.operator.planner import Observed, plan

    job = load_job(file, overrides, check_backends=False)
    ns = namespace or job.metadata.namespace or "default"
    objects: dict[tuple[str, str], dict[str, object]] = {}
    stages = [{}, {"preparation": {"done": True}}] if job.spec.data.prepare else [{}]
    for status in stages:  # before the preparation stage, and after it
        p = plan(job, name=job.metadata.name, namespace=ns, uid="<uid of the PretrainJob>", generation=1,
                 status=status, observed=Observed(), now=datetime.utcnow())  # fmt: skip
        objects.update({(o["kind"], o["metadata"]["name"]): o for o in p.create})
    click.echo(yaml.safe_dump_all(list(objects.values()), sort_keys=False, width=120), nl=False)


@click.command()
@click.option("--namespace", "namespaces", multiple=True, help="Watch only this namespace (repeatable).")
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch the whole cluster (the default without --namespace).")
@click.option("--health-port", type=int, default=8080, show_default=True, help="Liveness endpoint /healthz.")
@click.option("--metrics-port", type=int, default=9090, show_default=True, help="Operator metrics /metrics (0: off).")
@click.option(
    "--reconcile-interval",
    type=click.FloatRange(min=0.5),
    default=300.0,
    show_default=True,
    help="Seconds between reconciles of a job when nothing happens (watch events drive the rest).",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.5),
    default=60.0,
    show_default=True,
    help="Seconds between scrapes of a running job's node 0 metrics into status.progress.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option("--leader-elect", is_flag=True, help="Act only while holding a Lease (run several replicas).")
@click.option(
    "--leader-election-namespace",
    default=None,
    help="Namespace of the Lease (default: $POD_NAMESPACE, the pod's own, or the kubeconfig's).",
)
@click.option("--leader-election-id", default="pretrain-operator", show_default=True, help="Name of the Lease.")
@click.option("--lease-duration", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="Seconds a standby waits on an unrenewed lease before taking it.")  # fmt: skip
@click.option("--renew-deadline", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Seconds the leader retries renewing before it gives up and exits.")  # fmt: skip
@click.option("--retry-period", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between tries to acquire or renew.")  # fmt: skip
def operator(namespaces: tuple[str, ...], all_namespaces: bool, health_port: int, metrics_port: int,
             reconcile_interval: float, progress_interval: float, log_level: str, leader_elect: bool,
             leader_election_namespace: str | None, leader_election_id: str, lease_duration: float,
             renew_deadline: float, retry_period: float) -> None:  # fmt: skip
    """Run the PretrainJob operator (in a pod, or against your kubeconfig).

    With --leader-elect (the Helm chart's default) any number of replicas may run: the one holding
    the Lease reconciles, the others watch and stand by, and take over within --lease-duration of
    the leader's death (at once when it shuts down cleanly). Without it, run one replica only."""
    import logging
    import os

    if namespaces and all_namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    os.environ["PRETRAIN_RECONCILE_INTERVAL"] = str(reconcile_interval)
    os.environ["PRETRAIN_PROGRESS_INTERVAL"] = str(progress_interval)

    import kopf
    from prometheus_client import start_http_server

    import pretrain.operator.handlers
    from pretrain.operator.metrics import REGISTRY

    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if metrics_port:
        start_http_server(metrics_port, registry=REGISTRY)
    pretrain.operator.handlers.SETTINGS.namespaces = list(namespaces)
    elector = None
    if leader_elect:
        if not lease_duration > renew_deadline > retry_period:
            raise click.UsageError("need --lease-duration > --renew-deadline > --retry-period")
        elector = _start_election(leader_election_namespace, leader_election_id,
                                  Timing(lease_duration, renew_deadline, retry_period))  # fmt: skip
    try:
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        )
    finally:
        if elector is not None:
            elector.stop(release=not elector.lost)
    if elector is not None and elector.lost:
        raise click.ClickException("lost the leader lease; exiting so that a fresh process stands by")


def _start_election(namespace: str | None, lease_name: str, timing: Timing) -> LeaderElector:
    """Start the election thread; the controller's gate is its `leading` flag. Losing the lease
    stops the operator (SIGTERM to itself: Kopf shuts down cleanly, the process exits 1)."""
    import os
    import signal
    import socket
    import uuid

    import kubernetes

    from pretrain.operator import handlers
    from pretrain.operator.cluster import load_config
    from pretrain.operator.leader import LeaseLock

    own_namespace = load_config()
    namespace = namespace or os.environ.get("POD_NAMESPACE") or own_namespace
    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    lock = LeaseLock(kubernetes.client.ApiClient(), namespace, lease_name)
    elector = LeaderElector(lock, identity, timing, on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    handlers.SETTINGS.gate = elector.leading
    click.echo(f"leader election: lease {namespace}/{lease_name} as {identity}", err=True)
    return elector.start()
