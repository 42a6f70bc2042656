"""The `pretrain` command.

Exit codes: 0 ok, 1 invalid input (one line on stderr naming the field), 2 usage. Heavy imports
(torch, deepspeed, transformers) happen inside the commands that train, so `validate` and `crd`
start in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pretrain import __version__
from pretrain.api.validation import SpecError
from pretrain.clitools import friendly_errors, set_option
from pretrain.commands import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pretrain")
def main() -> None:
    """Pre-train transformer language models, locally or on Kubernetes."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@set_option
@friendly_errors
def validate(files: tuple[Path, ...], overrides: tuple[str, ...]) -> None:
    """Check PretrainJob files: types, ranges and cross-field rules, and a local pretrained
    tokenizer's size and ids against the model's vocabulary."""
    from pretrain.api.validation import load_job, spec_warnings
    from pretrain.data.tokenizer_bounds import check_tokenizer_path

    bad = 0
    for f in files:
        try:
            job = load_job(f, overrides)
            if job.spec.tokenizer.type == "pretrained" and job.spec.tokenizer.path:
                check_tokenizer_path(job.spec.tokenizer.path, job.spec.model.vocab_size, here=False)
        except SpecError as e:
            click.echo(f"error: {e}" if e.path == str(f) else f"error: {f}: {e}", err=True)  # the file named once
            bad += 1
        else:
            click.echo(f"{f}: ok ({job.metadata.name}, {job.spec.model.family}, {job.spec.world_size} processes)")
            for warning in spec_warnings(job.spec):
                click.echo(f"warning: {f}: {warning}", err=True)
    if bad:
        sys.exit(1)


@main.command()
def crd() -> None:
    """Print the PretrainJob CustomResourceDefinition (YAML)."""
    from pretrain.api.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command()
def reference() -> None:
    """Print the PretrainJob API reference (Markdown), generated from the models."""
    from pretrain.api.reference import reference as build

    click.echo(build())


# Commands that live beside what they drive; each module imports torch & co. only when run.
for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
