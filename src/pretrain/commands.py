"""The sub-commands of `pretrain` defined outside cli.py, in the order `--help` lists them."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
