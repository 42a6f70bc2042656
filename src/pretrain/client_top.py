"""`pretrain top`: a live table of the namespace's PretrainJobs (phase, step of total, loss,
tokens/s, MFU, ETA, restarts, goodput, age), redrawn every few seconds, as `kubectl get ptj -w` would
be if it redrew in place. `--once` prints the table once (for scripts and logs)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click

from pretrain.client_cli import cluster_options, duration, goodput_ratio, make_client
from pretrain.clitools import friendly_errors
from pretrain.timestamps import parse_time

COLUMNS = ("NAME", "PHASE", "STEP", "LOSS", "TOKENS/S", "MFU", "ETA", "RESTARTS", "GOODPUT", "AGE")


def utcnow() -> datetime:
    """Now as a naive UTC datetime, the form `parse_time` gives."""
    return datetime.now(UTC).replace(tzinfo=None)


def top_row(job: dict[str, Any], now: datetime) -> tuple[str, ...]:
    """One job's cells at `now` (naive UTC); "-" where the status does not say."""
    st = job.get("status") or {}
    p = st.get("progress") or {}
    step = "-" if p.get("step") is None else f"{p['step']}" + (f"/{p['totalSteps']}" if p.get("totalSteps") else "")
    loss = f"{p['loss']:.4f}" if isinstance(p.get("loss"), int | float) else "-"
    tps = f"{p['tokensPerSecond']:,.0f}" if isinstance(p.get("tokensPerSecond"), int | float) else "-"
    mfu = f"{p['mfu']:.1%}" if isinstance(p.get("mfu"), int | float) else "-"
    running = st.get("phase") == "Running"
    eta = duration(p["etaSeconds"]) if running and isinstance(p.get("etaSeconds"), int | float) else "-"
    ratio = goodput_ratio(st)
    goodput = "-" if ratio is None else f"{ratio:.0%}"
    restarts = str(st.get("restarts", 0)) + (f" (+{st['uncountedRestarts']})" if st.get("uncountedRestarts") else "")
    created = parse_time(job["metadata"].get("creationTimestamp"))  # naive UTC, as `now` is
    age = duration((now - created).total_seconds()) if created else "-"
    return (job["metadata"]["name"], st.get("phase") or "-", step, loss, tps, mfu, eta, restarts, goodput, age)


def top_table(jobs: list[dict[str, Any]], now: datetime) -> Any:
    from rich.table import Table

    table = Table(*COLUMNS, box=None, header_style="bold", pad_edge=False)
    for job in jobs:
        table.add_row(*top_row(job, now))
    if not jobs:
        table.add_row("(no PretrainJobs)", *[""] * (len(COLUMNS) - 1))
    return table


@click.command()
@cluster_options
@click.option(
    "--interval", type=click.FloatRange(min=0.5), default=2.0, show_default=True, help="Seconds between redraws."
)
@click.option("--once", is_flag=True, help="Print the table once and exit.")
@friendly_errors
def top(namespace: str | None, context: str | None, kubeconfig: str | None, interval: float, once: bool) -> None:
    """A live table of the namespace's jobs: phase, step, loss, tokens/s, MFU, ETA, restarts, goodput."""
    from rich.console import Console
    from rich.live import Live

    client = make_client(namespace, context, kubeconfig)
    console = Console()
    if once:
        console.print(top_table(client.list(), utcnow()))
        return
    with Live(top_table(client.list(), utcnow()), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(top_table(client.list(), utcnow()), refresh=True)
