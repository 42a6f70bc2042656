"""`pretrain tokenizer train` and `pretrain data prepare`: the trainer's data steps, run ahead of time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pretrain.api.validation import load_job
from pretrain.clitools import UserError, friendly_errors, set_option
from pretrain.data.sources import DataError


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
@set_option
@friendly_errors
def data_prepare(file: Path, output: Path | None, overrides: tuple[str, ...]) -> None:
    """Tokenize and pack FILE's corpus into shards (reused when inputs are unchanged)."""
    from pretrain.data.prepare import prepare_cached, text_sample
    from pretrain.data.tokenizer import build_tokenizer, fingerprint

    job = load_job(file, overrides)
    cache = output or Path("runs") / job.metadata.name / "work" / "data"
    t0 = time.perf_counter()
    try:
        tok = build_tokenizer(
            job.spec.tokenizer, text_sample(job.spec.data, job.spec.tokenizer.sample_bytes), job.spec.model.vocab_size
        )
        path = prepare_cached(job.spec.data, tok, fingerprint(tok), cache, job.spec.data.cache_uri, publish=True)
    except DataError as e:
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - t0
    m = json.loads((path / "manifest.json").read_text())
    train, val = m["splits"]["train"], m["splits"]["val"]
    click.echo(
        f"{path}: {train['rows']} training and {val['rows']} validation sequences of {m['sequence_length']} tokens "
        f"({train['tokens'] + val['tokens']:,} tokens, {len(train['shards']) + len(val['shards'])} shards, "
        f"tokenizer {m['tokenizer_fingerprint']}) in {seconds:.1f}s"
    )
