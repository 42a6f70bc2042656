"""The sub-commands of `pretrain` defined outside cli.py, in the order `--help` lists them."""

from __future__ import annotations

import click

from pretrain.launch import generate, run

COMMANDS: list[click.Command] = [run, generate]
