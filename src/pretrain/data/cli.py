"""`pretrain tokenizer train` and `pretrain data prepare`: the trainer's data steps, run ahead of time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from pretrain.api.validation import load_job
from pretrain.clitools import friendly_errors, set_option
from pretrain.data.sources import DataError
from pretrain.errors import UserError


@click.group()
def tokenizer() -> None:
    """Train or inspect tokenizers."""


@tokenizer.command("train")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--vocab-size", type=click.IntRange(min=300), default=None, help="Default: tokenizer.vocabSize.")
@click.option("--output", required=True, help="Directory or URI to save the Hugging Face tokenizer to.")
@set_option
@friendly_errors
def tokenizer_train(file: Path, vocab_size: int | None, output: str, overrides: tuple[str, ...]) -> None:
    """Train a byte-level BPE tokenizer on a sample of FILE's corpus."""
    import tempfile

    from pretrain.data.prepare import text_sample
    from pretrain.data.tokenizer import fingerprint, save, train_bpe
    from pretrain.storage.fs import upload_dir

    job = load_job(file, overrides)
    size = vocab_size or job.spec.tokenizer.vocab_size
    t0 = time.perf_counter()
    try:
        tok = train_bpe(text_sample(job.spec.data, job.spec.tokenizer.sample_bytes), size)
    except DataError as e:
        raise UserError(str(e)) from None
    local = Path(tempfile.mkdtemp(prefix="pretrain-tok-")) if "://" in output else Path(output)
    save(tok, local)
    if "://" in output:
        upload_dir(local, output)
    click.echo(
        f"tokenizer: {len(tok)} tokens, fingerprint {fingerprint(tok)}, {time.perf_counter() - t0:.1f}s -> {output}"
    )
    click.echo(f"use it with: --set tokenizer.type=pretrained --set tokenizer.path={output}")


@click.group()
def data() -> None:
    """Prepare training data."""


@data.command("prepare")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local cache folder (default ./runs/<name>/work/data).")  # fmt: skip
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Processes on this machine, each preparing a share of the units of work.")  # fmt: skip
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Prepare only this worker's share, of --count (an Indexed Job's $JOB_COMPLETION_INDEX).")  # fmt: skip
@click.option("--count", type=click.IntRange(1, 100000), default=None,
              help="Workers sharing the preparation, with --index or --commit.")  # fmt: skip
@click.option("--commit", is_flag=True, help="Join the --count parts in the output folder into the dataset.")
@set_option
@friendly_errors
def data_prepare(file: Path, output: Path | None, workers: int, index: int | None, count: int | None, commit: bool,
                 overrides: tuple[str, ...]) -> None:  # fmt: skip
    """Tokenize and pack FILE's corpus into shards (reused when inputs are unchanged): at once,
    or one worker's part at a time (--index k --count n on n machines, then --commit --count n)."""

    if (index is not None or commit) and count is None:
        raise UserError("--index and --commit need --count (the number of workers)")
    if index is not None and commit:
        raise UserError("--index prepares one part and --commit joins them: give one")
    job = load_job(file, overrides)
    cache = output or Path("runs") / job.metadata.name / "work" / "data"
    t0 = time.perf_counter()
    try:
        tok = _job_tokenizer(job)
        if index is not None and count is not None:
            return _prepare_one_part(job, tok, cache, index, count, t0)
        where, m = (
            _commit(job, tok, cache, count) if commit and count is not None else _prepare(job, tok, cache, workers)
        )
    except DataError as e:
        raise UserError(str(e)) from None
    train, val = m["splits"]["train"], m["splits"]["val"]
    click.echo(
        f"{where}: {train['rows']} training and {val['rows']} validation sequences of {m['sequence_length']} tokens "
        f"({train['tokens'] + val['tokens']:,} tokens, {len(train['shards']) + len(val['shards'])} shards, "
        f"{m['units']} units, tokenizer {m['tokenizer_fingerprint']}) in {time.perf_counter() - t0:.1f}s"
    )
    return None


def _prepare(job: Any, tok: Any, cache: Path, workers: int) -> tuple[str, dict[str, Any]]:
    from pretrain.data.prepare import prepare_cached
    from pretrain.data.tokenizer import fingerprint

    path = prepare_cached(job.spec.data, tok, fingerprint(tok), cache, job.spec.data.cache_uri, publish=True,
                          workers=workers)  # fmt: skip
    return str(path), json.loads((path / "manifest.json").read_text())


def _commit(job: Any, tok: Any, cache: Path, count: int) -> tuple[str, dict[str, Any]]:
    """The parts joined where they are: data.cacheUri when set, else the output folder."""
    from pretrain.data.prepare import commit_parts, commit_remote
    from pretrain.data.tokenizer import fingerprint
    from pretrain.data.units import resolve_inputs

    data = job.spec.data
    inputs = resolve_inputs(data, fingerprint(tok))
    if data.cache_uri:
        return commit_remote(data, inputs, data.cache_uri, count, fingerprint(tok), cache)
    path = commit_parts(data, inputs, cache, count, fingerprint(tok))
    return str(path), json.loads((path / "manifest.json").read_text())


def _job_tokenizer(job: Any) -> Any:
    from pretrain.data.prepare import text_sample
    from pretrain.data.tokenizer import build_tokenizer

    spec = job.spec
    return build_tokenizer(spec.tokenizer, text_sample(spec.data, spec.tokenizer.sample_bytes), spec.model.vocab_size)


def _prepare_one_part(job: Any, tok: Any, cache: Path, index: int, count: int, t0: float) -> None:
    """One worker's part: into data.cacheUri when set (any machine; the last worker to finish
    commits the dataset there, and a dataset already committed is left as it is), else into the
    output folder (joined by --commit)."""
    from pretrain.contract import PREPARED_KEY
    from pretrain.data.parts import prepare_part
    from pretrain.data.prepare import commit_remote, part_summary, parts_folder, prepare_remote_part, remote_state
    from pretrain.data.tokenizer import fingerprint
    from pretrain.data.units import plan_units, resolve_inputs, units_of
    from pretrain.termination import write_done

    data = job.spec.data
    inputs = resolve_inputs(data, fingerprint(tok))
    if not data.cache_uri:
        path = prepare_part(data, tok, inputs, parts_folder(cache, inputs.fingerprint), index, count)
        n = len(units_of(count, index, len(plan_units(data, inputs))))
        click.echo(f"{path}: part {index} of {count}: {n} units in {time.perf_counter() - t0:.1f}s")
        return
    if remote_state(data.cache_uri, inputs.fingerprint, count)[0]:
        click.echo(f"{data.cache_uri.rstrip('/')}/{inputs.fingerprint}: already prepared, nothing to do")
        return
    where, made, part = prepare_remote_part(data, tok, inputs, data.cache_uri, index, count, cache)
    n = len(units_of(count, index, len(plan_units(data, inputs))))
    kept = "" if made else " (already there: kept)"
    summary = part_summary(part, data.sequence_length)
    click.echo(f"{where}: part {index} of {count}: {n} units, {summary['tokens']} tokens{kept} in "
               f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    committed, present = remote_state(data.cache_uri, inputs.fingerprint, count)
    if not committed and present == count:  # the last to finish: every part is there
        uri, m = commit_remote(data, inputs, data.cache_uri, count, fingerprint(tok), cache)
        click.echo(f"{uri}: committed, {m['splits']['train']['rows']} training sequences from {count} parts")
    elif not committed:
        click.echo(f"{present} of {count} parts written; the last worker to finish commits the dataset")
    write_done(summary, key=PREPARED_KEY)  # the pod's termination message: the operator counts the tokens
