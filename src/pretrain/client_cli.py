"""`pretrain submit/status/logs/wait/suspend/resume/delete`: PretrainJobs on a cluster from the
terminal, through `pretrain.client`. Installed also as `kubectl-pretrain`, so `kubectl pretrain
logs JOB -f` works. The kubeconfig, context and namespace are chosen as kubectl chooses them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pretrain.clitools import friendly_errors, set_option

if TYPE_CHECKING:
    from pretrain.client import PretrainClient

F = TypeVar("F", bound=Callable[..., Any])


def cluster_options(func: F) -> F:
    """-n/--namespace, --context and --kubeconfig, as kubectl has them."""
    func = click.option("--kubeconfig", default=None, help="A kubeconfig file (default: KUBECONFIG, ~/.kube/config).")(
        func
    )
    func = click.option("--context", default=None, help="A context of the kubeconfig (default: its current one).")(func)
    return click.option("-n", "--namespace", default=None, help="Default: the context's namespace, else default.")(func)


def make_client(namespace: str | None, context: str | None, kubeconfig: str | None) -> PretrainClient:
    from pretrain.client import PretrainClient

    return PretrainClient(namespace, context=context, kubeconfig=kubeconfig)


def duration(seconds: float) -> str:
    """kubectl's short ages: 45s, 3m12s, 5h4m, 2d3h."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def goodput_ratio(status: dict[str, Any]) -> float | None:
    """status.goodput's ratio once it means something: its totals are closed ones (a phase or an
    attempt counted when it ends), so a first attempt still running would show 0%."""
    seconds = (status.get("goodput") or {}).get("seconds") or {}
    ratio = seconds.get("ratio")
    ended = status.get("phase") in ("Succeeded", "Failed")
    return float(ratio) if isinstance(ratio, int | float) and (ended or seconds.get("training")) else None


def summary(name: str, status: dict[str, Any]) -> str:
    """The status as a few lines a person reads: phase and why, progress, checkpoint, goodput."""
    phase, reason = status.get("phase") or "no phase yet", status.get("reason")
    lines = [f"{name}: {phase}" + (f" ({reason})" if reason and reason != phase else "")]
    if status.get("message"):
        lines.append(f"  {status['message']}")
    nodes = status.get("nodes", "-")
    lines.append(f"  attempt {status.get('attempt', 0)}, restarts {status.get('restarts', 0)}, nodes {nodes}")
    p = status.get("progress") or {}
    if p.get("step") is not None:
        parts = [f"step {p['step']}" + (f"/{p['totalSteps']}" if p.get("totalSteps") else "")]
        parts += [f"{label} {p[key]:g}" for key, label in (("loss", "loss"), ("tokensPerSecond", "tokens/s"))
                  if isinstance(p.get(key), int | float)]  # fmt: skip
        if phase == "Running" and isinstance(p.get("etaSeconds"), int | float):
            parts.append(f"ETA {duration(p['etaSeconds'])}")
        lines.append("  " + ", ".join(parts))
    ckpt = status.get("lastCheckpoint") or {}
    if ckpt.get("step") is not None:
        lines.append(f"  last checkpoint: step {ckpt['step']}" + (f" at {ckpt['uri']}" if ckpt.get("uri") else ""))
    ratio = goodput_ratio(status)
    if ratio is not None:
        lines.append(f"  goodput: {ratio:.0%} of the wall time trained")
    return "\n".join(lines)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@cluster_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end; exit 1 if it fails.")
@click.option("-f", "--follow", is_flag=True, help="Stream rank 0's log of the first attempt once it runs.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@friendly_errors
def submit(file: Path, overrides: tuple[str, ...], namespace: str | None, context: str | None,
           kubeconfig: str | None, wait_: bool, follow: bool, timeout: float | None) -> None:  # fmt: skip
    """Validate a PretrainJob file and create it on the cluster."""
    c = make_client(namespace, context, kubeconfig)
    name = c.submit(file, overrides)
    click.echo(f"pretrainjob.pretrain.io/{name} created")
    if follow:
        c.wait(name, timeout=timeout, until=("Running", "Succeeded"))
        for line in c.logs(name, follow=True):
            click.echo(line)
    if wait_:
        click.echo(summary(name, c.wait(name, timeout=timeout)))


@click.command()
@click.argument("job")
@cluster_options
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@friendly_errors
def status(job: str, namespace: str | None, context: str | None, kubeconfig: str | None, output: str) -> None:
    """A job's phase, progress, last checkpoint and goodput."""
    st = make_client(namespace, context, kubeconfig).status(job)
    click.echo(json.dumps(st, indent=2, sort_keys=True) if output == "json" else summary(job, st))


@click.command()
@click.argument("job")
@cluster_options
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True, help="The node whose pod to read.")
@click.option("-f", "--follow", is_flag=True, help="Stream until the container ends.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="The last N lines only.")
@friendly_errors
def logs(job: str, namespace: str | None, context: str | None, kubeconfig: str | None, rank: int, follow: bool,
         tail: int | None) -> None:  # fmt: skip
    """The log of a node's pod in the job's current attempt (rank 0 by default)."""
    for line in make_client(namespace, context, kubeconfig).logs(job, rank, follow=follow, tail=tail):
        click.echo(line)


@click.command()
@click.argument("job")
@cluster_options
@click.option("--for", "until", type=click.Choice(["Running", "Succeeded", "Failed", "Suspended", "end"]),
              default="end", show_default=True, help="The phase to wait for (end: Succeeded or Failed).")  # fmt: skip
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most.")
@friendly_errors
def wait(job: str, namespace: str | None, context: str | None, kubeconfig: str | None, until: str,
         timeout: float | None) -> None:  # fmt: skip
    """Wait for a job's phase; exit 1 if it fails first or the timeout passes."""
    from pretrain.client import FINAL_PHASES

    phases = FINAL_PHASES if until == "end" else (until,)
    click.echo(summary(job, make_client(namespace, context, kubeconfig).wait(job, timeout=timeout, until=phases)))


def _set_suspend(suspend: bool) -> click.Command:
    verb = "suspend" if suspend else "resume"

    @click.command(name=verb)
    @click.argument("job")
    @cluster_options
    @friendly_errors
    def command(job: str, namespace: str | None, context: str | None, kubeconfig: str | None) -> None:
        make_client(namespace, context, kubeconfig).set_suspend(job, suspend)
        click.echo(f"pretrainjob.pretrain.io/{job} {'suspended' if suspend else 'resumed'}")

    command.help = ("Suspend a job: its pods are deleted, the job held (runPolicy.suspend)." if suspend
                    else "Resume a suspended job from its newest checkpoint.")  # fmt: skip
    return command


@click.command()
@click.argument("job")
@cluster_options
@friendly_errors
def delete(job: str, namespace: str | None, context: str | None, kubeconfig: str | None) -> None:
    """Delete a job (its pods, Service and ConfigMap go with it; checkpoints stay)."""
    make_client(namespace, context, kubeconfig).delete(job)
    click.echo(f'pretrainjob.pretrain.io "{job}" deleted')


CLIENT_COMMANDS: list[click.Command] = [submit, status, logs, wait, _set_suspend(True), _set_suspend(False), delete]
