"""`pretrain report`: the command over `pretrain.report`, which draws a run's curves; a job on
the cluster is found through `pretrain.client` (the library itself needs no cluster client)."""

from __future__ import annotations

from pathlib import Path

import click

from pretrain.clitools import friendly_errors
from pretrain.report import write_report
from pretrain.storage.fs import is_local, local_path


@click.command()
@click.argument("runs", nargs=-1)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs and report.html (default: <first run>/report, or ./report for a URI).")  # fmt: skip
@click.option("--job", "jobs", multiple=True, metavar="NAME",
              help="A PretrainJob on the cluster: its checkpoint.uri, read from the API (repeatable).")  # fmt: skip
@click.option("-n", "--namespace", default=None, help="The jobs' namespace (default: the kubeconfig context's).")
@friendly_errors
def report(runs: tuple[str, ...], output: Path | None, jobs: tuple[str, ...], namespace: str | None) -> None:
    """Plot the curves of one or more runs (overlaid) and write an HTML report.

    RUNS are `pretrain run` folders or checkpoint locations (folders or s3://, gs://, ... URIs);
    --job names a job on the cluster instead (its history lies beside its checkpoints)."""
    if jobs:
        from pretrain.client import PretrainClient

        client = PretrainClient(namespace)
        runs = (*runs, *(client.checkpoint_uri(j) for j in jobs))
    if not runs:
        raise click.UsageError("name a run folder, a checkpoint location or --job NAME")
    if output is None:
        output = local_path(runs[0]) / "report" if is_local(runs[0]) else Path("report")
    page = write_report(list(runs), output)
    click.echo(f"report: {page}")
