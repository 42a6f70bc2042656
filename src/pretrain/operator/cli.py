"""`pretrain render` (what a job would create) and `pretrain operator` (run the controller)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from pretrain.api.validation import load_job
from pretrain.clitools import friendly_errors, set_option


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--namespace", default=None, help="Namespace (default: metadata.namespace or default).")
@set_option
@friendly_errors
def render(file: Path, namespace: str | None, overrides: tuple[str, ...]) -> None:
    """Print the manifests the operator creates for a new job (Service, ConfigMap, pods)."""
    import yaml

    from pretrain.operator.planner import Observed, plan

    job = load_job(file, overrides, check_backends=False)
    ns = namespace or job.metadata.namespace or "default"
    p = plan(job, name=job.metadata.name, namespace=ns, uid="<uid of the PretrainJob>", generation=1, status={},
             observed=Observed(), now=datetime.utcnow())  # fmt: skip
    click.echo(yaml.safe_dump_all(p.create, sort_keys=False, width=120), nl=False)


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
def operator(namespaces: tuple[str, ...], all_namespaces: bool, health_port: int, metrics_port: int,
             reconcile_interval: float, progress_interval: float, log_level: str) -> None:  # fmt: skip
    """Run the PretrainJob operator (in a pod, or against your kubeconfig).

    One replica at a time: there is no leader election (the Helm chart allows replicaCount 0 or 1
    and replaces the pod with the Recreate strategy)."""
    import logging
    import os

    if namespaces and all_namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    os.environ["PRETRAIN_RECONCILE_INTERVAL"] = str(reconcile_interval)
    os.environ["PRETRAIN_PROGRESS_INTERVAL"] = str(progress_interval)

    import kopf
    from prometheus_client import start_http_server

    import pretrain.operator.handlers  # noqa: F401  (registers the handlers)
    from pretrain.operator.metrics import REGISTRY

    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if metrics_port:
        start_http_server(metrics_port, registry=REGISTRY)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
    )
