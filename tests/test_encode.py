"""The fast document encoder gives exactly the tokenizer's own ids, in and out of worker processes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.data import encode
from pretrain.data.encode import BatchEncoder, EncoderConfig, PieceEncoder, TokenizerEncoder, encoder_from_config
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import EOS, bytes_tokenizer, chars_tokenizer, fingerprint, train_bpe

CORPUS = Path(__file__).resolve().parents[1] / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt"
SAMPLE = CORPUS.read_text()[:200_000]


def variant(tok: Any, edit: dict[str, Any]) -> Any:
    """The same tokenizer with parts of its definition replaced (e.g. another pre-tokenizer)."""
    from tokenizers import Tokenizer

    from pretrain.data.tokenizer import _wrap

    definition = json.loads(tok.backend_tokenizer.to_str())
    definition.update(edit)
    return _wrap(Tokenizer.from_str(json.dumps(definition)))


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    bpe = train_bpe([SAMPLE], 600)
    prefix = variant(
        bpe, {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}
    )
    nfkc = variant(bpe, {"normalizer": {"type": "NFKC"}})
    return {"bpe": bpe, "bpe-prefix-space": prefix, "bpe-nfkc": nfkc, "chars": chars_tokenizer([SAMPLE]),
            "bytes": bytes_tokenizer()}  # fmt: skip


def expected(tok: Any, docs: list[str]) -> np.ndarray[Any, Any]:
    ids: list[int] = []
    for d in docs:
        ids += [*tok.backend_tokenizer.encode(d, add_special_tokens=False).ids, tok.eos_token_id]
    return np.array(ids, dtype=np.int64)


def local_encoder(tok: Any) -> Any:
    return encoder_from_config(EncoderConfig(tok.backend_tokenizer.to_str(), tok.eos_token_id, "uint32"))


def test_the_fast_path_is_chosen_where_it_is_exact(tokenizers: dict[str, Any]) -> None:
    kinds = {name: type(local_encoder(tok)) for name, tok in tokenizers.items()}
    assert kinds == {"bpe": PieceEncoder, "bpe-prefix-space": PieceEncoder, "bpe-nfkc": TokenizerEncoder,
                     "chars": PieceEncoder, "bytes": PieceEncoder}  # fmt: skip


@pytest.mark.parametrize("name", ["bpe", "bpe-prefix-space", "bpe-nfkc", "chars", "bytes"])
def test_corpus_ids_equal_the_tokenizer(tokenizers: dict[str, Any], name: str) -> None:
    tok = tokenizers[name]
    lines = CORPUS.read_text().splitlines(keepends=True)
    docs = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    enc = local_encoder(tok)
    got = np.concatenate([enc(docs[i : i + 100]) for i in range(0, len(docs), 100)])
    np.testing.assert_array_equal(got, expected(tok, docs))


PIECES = st.sampled_from(
    [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2003", "\u3000", "\x1c", "\x85", "'s", "'ll", "'", "\u2019",
     "don't", "I'M", "42", "3.14", "٣", "½", "Ⅻ", "x²", "ünïcödé", "é", "é", "ﬁ", "ß", "Straße", "日本語", "한국어",
     "עברית", "مرحبا", "हिन्दी", "👩‍👩‍👧", "🙂", "\u200b", "\ufeff", "_", "--", "...", "?!", "<|endoftext|>",
     "<|pad|>", "<|endoftext", "\x00", "\U0010ffff", "\ud7ff", "ﷺ", "ǅ", "ʰ", "\u3007", "\u0301", "a\u0301"]
)  # fmt: skip
DOCS = st.lists(
    st.one_of(
        st.text(min_size=0, max_size=30),
        st.text(st.characters(max_codepoint=127), max_size=30),  # ASCII documents take another regex
        st.lists(st.one_of(PIECES, st.text(max_size=4))).map("".join),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(docs=DOCS)
def test_random_unicode_ids_equal_the_tokenizer(tokenizers: dict[str, Any], docs: list[str]) -> None:
    for tok in tokenizers.values():
        got = local_encoder(tok)(docs)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, expected(tok, docs))


def test_a_full_piece_memory_is_cleared_and_stays_exact(tokenizers: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(encode, "MAX_PIECES", 50)
    tok = tokenizers["bpe"]
    enc = local_encoder(tok)
    docs = [SAMPLE[i : i + 3000] for i in range(0, 60_000, 3000)]
    sizes = []
    for i in range(0, len(docs), 4):
        np.testing.assert_array_equal(enc(docs[i : i + 4]), expected(tok, docs[i : i + 4]))
        sizes.append(len(enc._index))
    assert any(later < earlier for earlier, later in itertools.pairwise(sizes)), f"never cleared: {sizes}"


def test_worker_processes_keep_batch_order(tokenizers: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(encode, "PARALLEL_AFTER_CHARS", 1)
    tok = tokenizers["bpe"]
    batches = [[SAMPLE[i : i + 500], SAMPLE[i + 500 : i + 1700]] for i in range(0, 120_000, 1700)]
    with BatchEncoder(tok, np.dtype(np.uint16), workers=2) as enc:
        got = list(enc.map(batches))
        assert enc._pool is not None, "the workers must have been used"
    assert len(got) == len(batches)
    for batch, ids in zip(batches, got, strict=True):
        np.testing.assert_array_equal(ids, expected(tok, batch))


def test_a_killed_worker_does_not_hang_or_lose_batches(tokenizers: dict[str, Any], monkeypatch: Any) -> None:
    """The OOM killer may take a worker in a pod: the rest is encoded in-process, in order."""
    import os
    import signal

    monkeypatch.setattr(encode, "PARALLEL_AFTER_CHARS", 1)
    tok = tokenizers["bpe"]
    batches = [[SAMPLE[i : i + 1500]] for i in range(0, 150_000, 1500)]
    got = []
    with BatchEncoder(tok, np.dtype(np.uint16), workers=2) as enc:
        stream = enc.map(batches)
        got += [next(stream), next(stream), next(stream)]
        assert enc._pool is not None
        for pid in list(enc._pool._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
        got += list(stream)
        assert enc._pool is None, "the broken pool must have been dropped"
    assert len(got) == len(batches)
    for batch, ids in zip(batches, got, strict=True):
        np.testing.assert_array_equal(ids, expected(tok, batch))


def test_prepare_with_workers_writes_the_same_shards(tmp_path: Path, monkeypatch: Any) -> None:
    from pretrain.api.spec import DataSourceSpec, DataSpec

    corpus = tmp_path / "corpus.jsonl"
    lines = SAMPLE.splitlines(keepends=True)
    corpus.write_text("\n".join(json.dumps({"text": "".join(lines[i : i + 20])}) for i in range(0, len(lines), 20)))
    tok = train_bpe([SAMPLE], 600)
    spec = DataSpec(sources=[DataSourceSpec(uri=str(corpus))], sequence_length=64, validation_split=0.1)
    monkeypatch.setattr("pretrain.data.parts.ENCODE_BATCH", 16)
    alone = prepare(spec, tok, fingerprint(tok), tmp_path / "alone")
    monkeypatch.setattr(encode, "PARALLEL_AFTER_CHARS", 1)
    monkeypatch.setattr(encode, "usable_cores", lambda: 2)
    pooled = prepare(spec, tok, fingerprint(tok), tmp_path / "pooled")
    assert (alone / "manifest.json").read_text() == (pooled / "manifest.json").read_text()
    for shard in sorted(alone.glob("*.bin")):
        assert shard.read_bytes() == (pooled / shard.name).read_bytes()
    assert EOS in tok.get_vocab()


@pytest.mark.parametrize(
    ("files", "limit"),
    [({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "250000 100000\n"}, 2.5),
     ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, 4.0),
     ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None), ({}, None)],
)  # fmt: skip
def test_cgroup_cpu_quota_bounds_the_workers(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert encode.cgroup_cpu_limit(tmp_path) == limit
