"""Data: tokenizers, packing into shards, and the loader's partition, order and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.api.spec import DataSourceSpec, DataSpec, TokenizerSpec
from pretrain.data.collator import IGNORE_INDEX, Collator
from pretrain.data.loader import DistributedLoader, PackedSplit, eval_batches
from pretrain.data.prepare import prepare, text_sample
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import build_tokenizer, bytes_tokenizer, chars_tokenizer, fingerprint
from tests.splits import IndexSplit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "crown", "sword", "night", "day", "love", "war", "peace"]
    for i in range(3):
        lines = [" ".join(rng.choice(words, size=12)) for _ in range(200)]
        (d / f"part-{i}.txt").write_text("\n".join(lines) + "\n")
    return d


def data_spec(uri: str, **kw: Any) -> DataSpec:
    return DataSpec(sources=[DataSourceSpec(uri=uri)], sequence_length=16, **kw)


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = data_spec(str(corpus / "*.txt"), validation_split=0.1)
    tok = bytes_tokenizer()
    return prepare(spec, tok, fingerprint(tok), tmp_path_factory.mktemp("cache"), shard_rows=100)


def test_bytes_and_chars_round_trip() -> None:
    text = "To be, or not to be:\n\tthat is the question. Ünïcode ✓"
    b = bytes_tokenizer()
    assert b.decode(b.encode(text)) == text
    assert len(b) == 260
    c = chars_tokenizer([text])
    assert c.decode(c.encode(text)) == text
    assert len(c) == len(set(text)) + 4


def test_bpe_trains_and_compresses(corpus: Path) -> None:
    spec = data_spec(str(corpus / "*.txt"))
    tok = build_tokenizer(TokenizerSpec(type="bpe", vocab_size=300), text_sample(spec, 10**6))
    sample = (corpus / "part-0.txt").read_text()[:2000]
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample.encode()) / 2


def test_prepare_layout_and_reuse(prepared: Path, corpus: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    train, val = PackedSplit(prepared, "train"), PackedSplit(prepared, "val")
    total_bytes = sum(p.stat().st_size for p in corpus.glob("*.txt"))
    # every byte of the corpus plus one EOS per chunk, cut into whole rows of 16 in each of the
    # 3 files (units of work: each drops its last partial row)
    assert manifest["units"] == 3
    assert (len(train) + len(val)) * 16 == pytest.approx(total_bytes + 3 - 3 * 8, abs=3 * 8)
    assert len(train.shards) > 1, "shard_rows=100 must split the training rows"
    assert manifest["splits"]["train"]["rows"] == len(train)
    per_file = [len(p.read_bytes()) + 1 for p in sorted(corpus.glob("*.txt"))]  # bytes and one EOS
    assert len(val) == sum(int(np.ceil(n // 16 * 0.1)) for n in per_file), "each unit's last tenth"
    tok = bytes_tokenizer()
    assert manifest["tokenizer_fingerprint"] == fingerprint(tok)
    again = prepare(data_spec(str(corpus / "*.txt"), validation_split=0.1), tok, fingerprint(tok), prepared.parent)
    assert again == prepared


def test_changed_inputs_make_a_new_dataset(corpus: Path, tmp_path: Path) -> None:
    tok = bytes_tokenizer()
    spec = data_spec(str(corpus / "part-0.txt"))
    first = prepare(spec, tok, fingerprint(tok), tmp_path)
    other_tok = chars_tokenizer(["abc "])
    assert prepare(spec, other_tok, fingerprint(other_tok), tmp_path) != first
    copy = tmp_path / "copy.txt"
    copy.write_text((corpus / "part-0.txt").read_text())
    base = prepare(data_spec(str(copy)), tok, fingerprint(tok), tmp_path)
    copy.write_text(copy.read_text() + "more text appended\n")
    assert prepare(data_spec(str(copy)), tok, fingerprint(tok), tmp_path) != base


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_an_epoch(prepared: Path, world: int) -> None:
    split = PackedSplit(prepared, "train")
    n = len(split)
    micro, accum = 2, 2
    loaders = [
        DistributedLoader(split, rank=r, world_size=world, micro_batch=micro, accumulation=accum, seed=7)
        for r in range(world)
    ]
    global_batch = micro * accum * world
    steps = n // global_batch
    seen: list[list[int]] = [[] for _ in range(world)]
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            start = loader.consumed
            for m in range(accum):
                idx = loader.stream(start + (m * world + r) * micro, micro)
                seen[r].extend(idx.tolist())
            loader.next_step()
    # leftover of the epoch (fewer than one global batch) goes to the first items of the next step
    tail = loaders[0].stream(steps * global_batch, n - steps * global_batch).tolist()
    flat = [i for s in seen for i in s] + tail
    assert sorted(flat) == list(range(n)), "an epoch covers every row exactly once"
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b]), "ranks overlap"


def test_same_seed_same_order_other_seed_differs(prepared: Path) -> None:
    split = PackedSplit(prepared, "train")

    def first_batches(seed: int) -> list[np.ndarray[Any, Any]]:
        loader = DistributedLoader(split, rank=0, world_size=1, micro_batch=4, accumulation=1, seed=seed)
        return [loader.next_step()[0] for _ in range(5)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))


def test_epochs_continue_with_a_new_order(prepared: Path) -> None:
    split = PackedSplit(prepared, "train")
    loader = DistributedLoader(split, rank=0, world_size=1, micro_batch=1, accumulation=1, seed=3)
    n = len(split)
    e0, e1 = loader.stream(0, n), loader.stream(n, n)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert e0.tolist() != e1.tolist()


@settings(max_examples=40, deadline=None)
@given(
    world=st.integers(1, 3),
    micro=st.integers(1, 3),
    accum=st.integers(1, 3),
    stop=st.integers(0, 60),
    more=st.integers(1, 8),
)
def test_restored_loader_continues_exactly(
    prepared: Path, world: int, micro: int, accum: int, stop: int, more: int
) -> None:
    split = PackedSplit(prepared, "train")
    for rank in range(world):
        kw = dict(rank=rank, world_size=world, micro_batch=micro, accumulation=accum, seed=11)
        straight = DistributedLoader(split, **kw)  # type: ignore[arg-type]
        for _ in range(stop):
            straight.next_step()
        state = json.loads(json.dumps(straight.state_dict()))
        expected = [straight.next_step() for _ in range(more)]
        restored = DistributedLoader(split, **kw)  # type: ignore[arg-type]
        restored.load_state_dict(state)
        got = [restored.next_step() for _ in range(more)]
        for e, g in zip(expected, got, strict=True):
            assert all((x == y).all() for x, y in zip(e, g, strict=True))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (3, 2), (1, 3)])
def test_a_resize_mid_epoch_sees_every_row_once(before: int, after: int) -> None:
    """Global batch 12 at any world size (accumulation absorbs it): 5 steps at `before`
    processes, a checkpoint, the other 5 steps of the epoch at `after`: every row exactly once."""
    split = IndexSplit(12 * 10)
    seen: list[int] = []

    def run(world: int, count: int, state: dict[str, Any] | None) -> dict[str, Any]:
        loaders = [
            DistributedLoader(split, rank=r, world_size=world, micro_batch=2, accumulation=6 // world, seed=5)
            for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        for _ in range(count):
            for loader in loaders:
                seen.extend(int(i) for batch in loader.next_step() for i in batch[:, 0])
        return loaders[0].state_dict()

    run(after, 5, run(before, 5, None))
    assert sorted(seen) == list(range(len(split))), "each row of the epoch exactly once"


def test_loader_state_for_another_dataset_is_refused(prepared: Path) -> None:
    split = PackedSplit(prepared, "train")
    loader = DistributedLoader(split, rank=0, world_size=1, micro_batch=1, accumulation=1, seed=1)
    with pytest.raises(DataError, match="another dataset"):
        loader.load_state_dict({"consumed": 3, "seed": 1, "rows": len(split) + 1, "global_batch": 1})


def test_truncated_shard_is_named(prepared: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    shard = broken / "u000000-train-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"shard .*u000000-train-000001.bin: .*truncated or corrupt"):
        PackedSplit(broken, "train")
    flipped = tmp_path / "flipped"
    shutil.copytree(prepared, flipped)
    data = bytearray((flipped / "u000000-train-000000.bin").read_bytes())
    data[10] ^= 0xFF
    (flipped / "u000000-train-000000.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"u000000-train-000000.bin: checksum mismatch"):
        PackedSplit(flipped, "train").verify()


def test_weighted_sources_mix_by_weight(corpus: Path, tmp_path: Path) -> None:
    tok = bytes_tokenizer()
    spec = DataSpec(
        sources=[DataSourceSpec(uri=str(corpus / "part-0.txt"), weight=3.0), DataSourceSpec(uri=str(corpus / "part-1.txt"), weight=1.0)],
        sequence_length=16, validation_split=0.0,
    )  # fmt: skip
    split = PackedSplit(prepare(spec, tok, fingerprint(tok), tmp_path), "train")
    loader = DistributedLoader(split, rank=0, world_size=1, micro_batch=1, accumulation=1, seed=0, weights=[3.0, 1.0])
    order = loader.stream(0, len(split))
    share = (split.source_of(order) == 0).mean()
    assert share == pytest.approx(0.75, abs=0.01)


def test_the_tokens_of_each_source_are_counted_at_any_world_size_and_survive_resume(
    corpus: Path, tmp_path: Path
) -> None:
    """Issue 28 item 3: the weights come out in tokens over the run, counted by source; the count
    is the job's (every rank the same), kept in the loader's state, and recounted for a state
    from before it was kept."""
    tok = bytes_tokenizer()
    spec = DataSpec(
        sources=[DataSourceSpec(uri=str(corpus / "part-0.txt"), weight=1.0), DataSourceSpec(uri=str(corpus / "part-1.txt"), weight=3.0)],
        sequence_length=16, validation_split=0.0,
    )  # fmt: skip
    split = PackedSplit(prepare(spec, tok, fingerprint(tok), tmp_path), "train")

    def loader(rank: int, world: int) -> DistributedLoader:
        return DistributedLoader(split, rank=rank, world_size=world, micro_batch=4 // world, accumulation=2, seed=5,
                                 weights=[1.0, 3.0])  # fmt: skip

    one, ranks = loader(0, 1), [loader(r, 2) for r in range(2)]
    steps = 3 * len(split) // one.global_batch  # three epochs
    for _ in range(steps):
        one.next_step()
        for r in ranks:
            r.next_step()
    assert one.source_rows == ranks[0].source_rows == ranks[1].source_rows
    assert sum(one.source_rows.values()) == steps * one.global_batch
    assert one.source_rows[1] / sum(one.source_rows.values()) == pytest.approx(0.75, abs=0.01), "weights, in tokens"
    state = one.state_dict()
    resumed = loader(0, 2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as the checkpoint stores it
    legacy = loader(0, 1)
    legacy.load_state_dict({k: v for k, v in state.items() if k != "source_rows"})
    assert resumed.source_rows == legacy.source_rows == one.source_rows
    for other in (one, resumed):
        other.next_step()
    assert resumed.source_rows == one.source_rows


def test_mixture_stages_switch_at_their_token_boundary_at_any_world_size(corpus: Path, tmp_path: Path) -> None:
    """Issue 28 item 3: data.stages, weights that change at a token boundary (an anneal on one
    source), by stream position: the same rows at world sizes 1 and 2, and after a resume."""
    tok = bytes_tokenizer()
    spec = DataSpec(
        sources=[DataSourceSpec(uri=str(corpus / "part-0.txt")), DataSourceSpec(uri=str(corpus / "part-1.txt"))],
        sequence_length=16, validation_split=0.0,
    )  # fmt: skip
    split = PackedSplit(prepare(spec, tok, fingerprint(tok), tmp_path), "train")
    boundary = 100  # rows: until 1600 tokens source 0 alone, then source 1 alone
    stages: list[tuple[int | None, list[float]]] = [(boundary, [1.0, 0.0]), (None, [0.0, 1.0])]

    def loader(world: int, rank: int = 0) -> DistributedLoader:
        return DistributedLoader(split, rank=rank, world_size=world, micro_batch=4 // world, accumulation=1, seed=3,
                                 stages=stages)  # fmt: skip

    one = loader(1)
    order = one.stream(0, 2 * len(split) + boundary)  # past the boundary, over more than an epoch of stage 2
    sources = split.source_of(order)
    assert set(sources[:boundary].tolist()) == {0} and set(sources[boundary:].tolist()) == {1}
    assert np.array_equal(order[:boundary], loader(2).stream(0, boundary)), "world-size independent"
    steps = 60  # 240 rows: across the boundary
    for _ in range(steps):
        one.next_step()
    resumed = loader(2)
    resumed.load_state_dict(one.state_dict())
    assert resumed.source_rows == {0: boundary, 1: steps * 4 - boundary}
    ranks = [loader(2, r) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    got = np.concatenate([b for r in ranks for b in r.next_step()])  # rank 0's two rows, then rank 1's
    window = one.stream(one.consumed, 4)
    assert np.array_equal(got, split.rows(window)), "resumed at world size 2: the rows one process would take"
    assert set(split.source_of(window).tolist()) == {1}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("{d}/nothing-*.txt", "matches no files"),
        ("{d}/missing.txt", "no such file"),
        ("builtin://nope", "no such bundled corpus"),
    ],
)
def test_bad_sources_name_themselves(tmp_path: Path, uri: str, message: str) -> None:
    tok = bytes_tokenizer()
    with pytest.raises(DataError, match=message) as e:
        prepare(data_spec(uri.format(d=tmp_path)), tok, fingerprint(tok), tmp_path / "cache")
    assert str(tmp_path) in str(e.value) or "builtin://nope" in str(e.value)


def test_empty_corpus_and_missing_field(tmp_path: Path) -> None:
    tok = bytes_tokenizer()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt: too little text"):
        prepare(data_spec(str(tmp_path / "empty.txt")), tok, fingerprint(tok), tmp_path / "c")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: no text field 'text' \(fields: body\)"):
        prepare(data_spec(str(tmp_path / "rows.jsonl")), tok, fingerprint(tok), tmp_path / "c")


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"content": f"document number {i} " * 5} for i in range(50)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    tok = bytes_tokenizer()
    sizes = []
    for name in ("a.jsonl", "b.parquet"):
        spec = DataSpec(sources=[DataSourceSpec(uri=str(tmp_path / name), text_field="content")], sequence_length=16)
        sizes.append(len(PackedSplit(prepare(spec, tok, fingerprint(tok), tmp_path / "c"), "train")))
    assert sizes[0] == sizes[1] > 0


def test_mlm_masking_rates_and_determinism() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(10, 200, size=(64, 128))
    rows[:, ::17] = 3  # a special token that must never be masked
    collate = Collator(
        objective="mlm", vocab_size=260, mask_token_id=258, special_ids=(3,), mask_probability=0.15, seed=5
    )
    a = collate(rows, step=4, rank=1, micro=0)
    b = collate(rows, step=4, rank=1, micro=0)
    assert (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
    selected = a["labels"] != IGNORE_INDEX
    assert selected.mean() == pytest.approx(0.15 * (1 - 1 / 17), abs=0.01)
    assert not selected[:, ::17].any()
    masked = a["input_ids"][selected] == 258
    assert masked.mean() == pytest.approx(0.8, abs=0.03)
    unchanged = a["input_ids"][selected] == rows[selected]
    assert unchanged.mean() == pytest.approx(0.1, abs=0.03)
    assert (a["labels"][selected] == rows[selected]).all()
    clm = Collator(objective="clm", vocab_size=260)(rows)
    assert (clm["labels"] == rows).all()


def test_eval_batches_are_fixed_and_strided(prepared: Path) -> None:
    split = PackedSplit(prepared, "val")
    r0 = eval_batches(split, rank=0, world_size=2, micro_batch=2, steps=2)
    r1 = eval_batches(split, rank=1, world_size=2, micro_batch=2, steps=2)
    assert not (r0[0] == r1[0]).all()
    assert (r0[0] == eval_batches(split, rank=0, world_size=2, micro_batch=2, steps=2)[0]).all()


def test_shards_round_trip_through_s3(corpus: Path, tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepared shards published to a real S3 protocol server are fetched, not rebuilt, elsewhere."""
    import pretrain.storage.fs as storage_fs
    from pretrain.data.prepare import prepare_cached

    bucket = s3.bucket("prepared-shards")
    tok = bytes_tokenizer()
    spec = data_spec(str(corpus / "*.txt"), validation_split=0.1, cache_uri=f"s3://{bucket}/cache")
    uploads: list[str] = []
    real = storage_fs.with_retries

    def recorded(what: str, fn: Any, **kw: Any) -> Any:
        uploads.append(what)
        return real(what, fn, **kw)

    monkeypatch.setattr(storage_fs, "with_retries", recorded)
    first = prepare_cached(spec, tok, fingerprint(tok), tmp_path / "node0", spec.cache_uri, publish=True)
    monkeypatch.undo()
    assert uploads[-1] == "upload manifest.json" and len(uploads) > 2, "the manifest goes up last"
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"cache/{first.name}/manifest.json" in keys and any(k.endswith("-train-000000.bin") for k in keys)
    second = prepare_cached(spec, tok, fingerprint(tok), tmp_path / "node1", spec.cache_uri, publish=False)
    assert second.name == first.name and second.parent == tmp_path / "node1"
    a, b = PackedSplit(first, "train"), PackedSplit(second, "train")
    assert len(a) == len(b)
    idx = np.arange(len(a))
    assert (a.rows(idx) == b.rows(idx)).all()
    b.verify()


def test_s3_source_is_read(corpus: Path, tmp_path: Path, s3: Any) -> None:
    bucket = s3.bucket("raw-corpus")
    for f in sorted(corpus.glob("*.txt")):
        s3.client().upload_file(str(f), bucket, f"text/{f.name}")
    tok = bytes_tokenizer()
    remote = PackedSplit(
        prepare(data_spec(f"s3://{bucket}/text/*.txt"), tok, fingerprint(tok), tmp_path / "r"), "train"
    )
    local = PackedSplit(prepare(data_spec(str(corpus / "*.txt")), tok, fingerprint(tok), tmp_path / "l"), "train")
    idx = np.arange(len(local))
    assert len(remote) == len(local) and (remote.rows(idx) == local.rows(idx)).all()


def test_unreadable_uri_names_the_source(tmp_path: Path, s3: Any) -> None:
    tok = bytes_tokenizer()
    with pytest.raises(DataError, match=r"s3://no-such-bucket-here/x\.txt"):
        prepare(data_spec("s3://no-such-bucket-here/x.txt"), tok, fingerprint(tok), tmp_path)


def test_hf_dataset_by_local_directory(tmp_path: Path) -> None:
    """The hf:// path (Hugging Face datasets) with a local dataset folder, as users without network."""
    ds_dir = tmp_path / "my-dataset"
    ds_dir.mkdir()
    rows = [{"text": f"line {i} of a tiny dataset that datasets loads from a folder"} for i in range(100)]
    (ds_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = bytes_tokenizer()
    split = PackedSplit(prepare(data_spec(f"hf://{ds_dir}"), tok, fingerprint(tok), tmp_path / "c"), "train")
    text = tok.decode(split.rows(np.arange(4)).reshape(-1))
    assert text.startswith("line 0 of a tiny dataset that datasets loads")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("/proc/self/environ", "lies in /proc"),
        ("/dev/zero", "lies in /dev"),
        ("file:///etc/passwd", "lies in /etc"),
        ("{d}/link-to-environ", "lies in /proc"),  # a symbolic link in a data folder
        ("{d}/fifo", "not a regular file"),
        ("builtin://../../../../etc/hostname", "not a bundled corpus name"),
    ],
)
def test_sources_never_read_the_machines_own_files(tmp_path: Path, uri: str, message: str) -> None:
    import os

    (tmp_path / "link-to-environ").symlink_to("/proc/self/environ")
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    tok = bytes_tokenizer()
    with pytest.raises(DataError, match=message):
        prepare(data_spec(uri.format(d=tmp_path)), tok, fingerprint(tok), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.bin"))


def test_a_system_path_fails_validation_with_one_line() -> None:
    from pretrain.api.validation import SpecError, load_job
    from tests.conftest import ROOT

    with pytest.raises(SpecError, match=r"spec.data.sources\[0\].uri: lies in /proc"):
        load_job(ROOT / "examples" / "tiny-cpu.yaml", ["data.sources.0.uri=/proc/self/environ"])


def test_reads_are_bounded_without_newlines(tmp_path: Path) -> None:
    """A text file with no newline is read in chunks, and a JSONL "record" longer than the limit
    is refused, not read whole."""
    from pretrain.data import sources

    one_line = tmp_path / "one-line.txt"
    one_line.write_text("abc" * (sources.TEXT_CHUNK_CHARS))  # 3 chunks, no newline
    src = DataSourceSpec(uri=str(one_line))
    chunks = list(sources.iter_documents(src, sources.resolve_files(src)[0]))
    assert len(chunks) >= 2 and max(len(c) for c in chunks) <= 2 * sources.TEXT_CHUNK_CHARS
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "' + "x" * 1000 + '"}')
    old = sources.MAX_RECORD_CHARS
    sources.MAX_RECORD_CHARS = 100
    try:
        src = DataSourceSpec(uri=str(big))
        with pytest.raises(DataError, match=r"big.jsonl:1: a record longer than 100 characters"):
            list(sources.iter_rows(src, sources.resolve_files(src)[0]))
    finally:
        sources.MAX_RECORD_CHARS = old


def test_a_failed_or_killed_preparation_leaves_no_partial_folder(tmp_path: Path, corpus: Path) -> None:
    tok = bytes_tokenizer()
    (tmp_path / "empty.txt").write_text("")
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        prepare(data_spec(str(tmp_path / "empty.txt")), tok, fingerprint(tok), cache)
    assert list(cache.glob(".*partial*")) == [], "a failed preparation cleans up"
    dead = cache / ".0123456789abcdef.partial-999999999"  # a preparation killed with its process
    (dead / "train").mkdir(parents=True)
    prepare(data_spec(str(corpus)), tok, fingerprint(tok), cache)
    assert not dead.exists()
