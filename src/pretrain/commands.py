"""The sub-commands of `pretrain` defined outside cli.py, in the order `--help` lists them."""

from __future__ import annotations

import click

from pretrain.client_cli import CLIENT_COMMANDS
from pretrain.client_top import top
from pretrain.data.cli import data, tokenizer
from pretrain.launch import evaluate, generate, run
from pretrain.operator.cli import operator, render
from pretrain.report_cli import report
from pretrain.storage.cli import checkpoints

COMMANDS: list[click.Command] = [run, generate, evaluate, report, data, tokenizer, checkpoints, *CLIENT_COMMANDS, top,
                                 render, operator]  # fmt: skip
