"""`pretrain checkpoints list|verify URI`: what a job's checkpoint folder holds, and whether it loads."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from pretrain.clitools import friendly_errors
from pretrain.storage.checkpoint import INTERACTIVE_ATTEMPTS, CheckpointStore
from pretrain.storage.manifest import step_name, total_bytes


def _store(uri: str) -> CheckpointStore:
    return CheckpointStore(
        uri, workdir=Path(tempfile.mkdtemp(prefix="pretrain-ckpt-")), retry_attempts=INTERACTIVE_ATTEMPTS
    )


@click.group()
def checkpoints() -> None:
    """Inspect checkpoints in a folder or object storage URI."""


@checkpoints.command("list")
@click.argument("uri")
@friendly_errors
def list_(uri: str) -> None:
    """List checkpoints: step, state (complete or incomplete), size and time."""
    store = _store(uri)
    steps = store.steps()
    if not steps:
        click.echo(f"{uri}: no checkpoints")
        return
    click.echo(f"{'STEP':>10}  {'STATE':<10}  {'SIZE':>10}  TIME")
    for step in steps:
        m = store.manifest(step)
        if m is None:
            click.echo(f"{step:>10}  {'incomplete':<10}  {'-':>10}  -")
        else:
            size = total_bytes(m)
            click.echo(f"{step:>10}  {'complete':<10}  {size / 1e6:>8.1f}MB  {m.get('time', '-')}")


@checkpoints.command("verify")
@click.argument("uri")
@click.option("--step", type=int, default=None, help="Only this step (default: all).")
@click.option("--strict", is_flag=True, help="Exit 1 on any problem, an unfinished save included.")
@friendly_errors
def verify(uri: str, step: int | None, strict: bool) -> None:
    """Check every file of every checkpoint against its manifest (size and sha256).

    Exit 1 when the step named by --step fails, when no checkpoint is usable, or when the newest
    complete checkpoint is corrupt. A save that did not finish (no manifest: kill -9 mid-save) is
    reported but is not a failure: resume skips it, and the next run removes it."""
    store = _store(uri)
    steps = [step] if step is not None else store.steps()
    if not steps:
        click.echo(f"error: {uri}: no checkpoints", err=True)
        sys.exit(1)
    incomplete: list[int] = []
    bad: list[int] = []
    good: list[int] = []
    for s in steps:
        if store.manifest(s) is None:
            incomplete.append(s)
            click.echo(f"{step_name(s)}: incomplete (a save that did not finish; resume skips it)")
            continue
        problem = store.verify(s)
        click.echo(f"{step_name(s)}: {'ok' if problem is None else 'BAD: ' + problem}")
        (good if problem is None else bad).append(s)
    if good:
        click.echo(f"resume takes {step_name(max(good))}")
    failed = (
        (step is not None and step not in good)
        or not good
        or (bad and max(bad) > max(good))
        or (strict and (bad or incomplete))
    )
    if failed:
        sys.exit(1)
