"""Shared pieces of the `pretrain` command line: one-line errors and the --set option."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pretrain.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def friendly_errors(func: F) -> F:
    """Turn a UserError (pretrain.errors: every error meant for the user) into one line on stderr
    and exit code 1; anything else into one line naming its type; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as e:  # a bad spec, the cluster's refusal, a source or a store: one line
            fail(str(e))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # wrong credentials, an unreachable endpoint...: one line, not a traceback
            if os.environ.get("PRETRAIN_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"{type(e).__name__}: {first[:300]} (PRETRAIN_DEBUG=1 shows the traceback)")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="Override a field (camelCase path as in the YAML, e.g. training.maxSteps=100); repeatable.",
)


def shown(location: str | Path) -> str:
    """A path as a person reads it: relative to the current folder when it lies below it (URIs
    and paths elsewhere unchanged), so that output does not name the machine's layout."""
    text = str(location)
    if "://" in text:
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return text
