"""Streaming (issue 28 item 2): the block-window order, and ranks that read a dataset where it
lies through a bounded, verified block cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data import units
from pretrain.data.loader import DistributedLoader, PackedSplit
from pretrain.data.order import WINDOW_BLOCKS, EpochOrder, uniform_blocks
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError
from pretrain.data.stream import RemoteSplit
from pretrain.data.tokenizer import bytes_tokenizer, fingerprint

SEQ = 16
ROW_BYTES = SEQ * 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources, blocks of 8 rows, shards of 100 rows: a few hundred blocks."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for name, n in (("a", 900), ("b", 300)):
        (d / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(n)) + "\n")
    spec = DataSpec(sources=[DataSourceSpec(uri=str(d / "a.txt"), weight=1.0), DataSourceSpec(uri=str(d / "b.txt"))],
                    sequence_length=SEQ, validation_split=0.05)  # fmt: skip
    tok = bytes_tokenizer()
    saved = units.BLOCK_BYTES
    units.BLOCK_BYTES = 8 * ROW_BYTES
    try:
        return prepare(spec, tok, fingerprint(tok), tmp_path_factory.mktemp("cache"), shard_rows=100)
    finally:
        units.BLOCK_BYTES = saved


def remote(dataset: Path, tmp_path: Path, cache_bytes: int = 64 * 8 * ROW_BYTES, split: str = "train") -> RemoteSplit:
    return RemoteSplit(str(dataset), split, tmp_path / "stream-cache", cache_bytes)


def test_an_epoch_is_every_row_once_in_windows_of_blocks() -> None:
    blocks = uniform_blocks(10_000, 10)
    order = EpochOrder(blocks, [], seed=3, epoch=0)
    rows = order[np.arange(10_000)]
    assert sorted(rows.tolist()) == list(range(10_000)), "a permutation of the epoch"
    window_rows = WINDOW_BLOCKS * 10
    first = rows[:window_rows]
    assert len(np.unique(blocks.block_of(first))) == WINDOW_BLOCKS, "a window reads exactly its blocks"
    again = EpochOrder(blocks, [], seed=3, epoch=0)[np.arange(10_000)]
    other = EpochOrder(blocks, [], seed=3, epoch=1)[np.arange(10_000)]
    assert (again == rows).all() and not (other == rows).all()


def test_the_shuffle_is_measured_against_a_full_permutation() -> None:
    """What a window costs in randomness, measured on 2000 blocks of 100 rows and global batches
    of 256 rows: a batch of the window order draws its rows from as many distinct blocks as
    uniform draws from a window of WINDOW_BLOCKS blocks would (a full permutation: from ~all
    the corpus's blocks), and the batches' mean row index spreads about as under a full
    permutation (sources and regions of the corpus are not clumped into batches)."""
    blocks, batch = uniform_blocks(200_000, 100), 256
    window = EpochOrder(blocks, [], seed=0, epoch=0)[np.arange(batch * 700)].reshape(-1, batch)
    full = np.random.default_rng(0).permutation(200_000)[: batch * 700].reshape(-1, batch)
    distinct = {
        k: float(np.mean([len(np.unique(b // 100)) for b in o])) for k, o in (("window", window), ("full", full))
    }
    spread = {k: float(np.std(o.mean(axis=1))) for k, o in (("window", window), ("full", full))}
    expected = WINDOW_BLOCKS * (1 - (1 - 1 / WINDOW_BLOCKS) ** batch)
    assert distinct["window"] == pytest.approx(expected, rel=0.03), (distinct, expected)
    assert distinct["full"] > 0.9 * batch
    assert 0.8 < spread["window"] / spread["full"] < 1.5, spread


def test_weights_come_out_in_rows_with_blocks_of_many_sizes() -> None:
    from pretrain.data.order import Blocks

    starts = np.array([0, 7, 20, 21, 50, 51, 99, 130, 200, 260], dtype=np.int64)
    sources = np.array([0, 0, 1, 1, 0, 2, 2, 1, 0], dtype=np.int64)
    blocks = Blocks(starts, sources)
    order = EpochOrder(blocks, [1.0, 2.0, 0.0], seed=5, epoch=0)
    rows = order[np.arange(260)]
    got = np.bincount(blocks.source_of(rows), minlength=3)
    assert got.tolist() == [87, 173, 0], "1:2:0 of 260 rows, exactly"


def test_streamed_rows_equal_the_local_ones_at_any_world_size(dataset: Path, tmp_path: Path) -> None:
    local = PackedSplit(dataset, "train")
    streamed = remote(dataset, tmp_path)
    assert len(local) == len(streamed) and len(streamed.blocks().rows) > 50
    idx = np.random.default_rng(0).integers(0, len(local), 300)
    assert (local.rows(idx) == streamed.rows(idx)).all()
    for world in (1, 2, 3):
        kw: dict[str, Any] = {"micro_batch": 2, "accumulation": 6 // world, "seed": 9, "weights": [1.0, 3.0]}
        a = [DistributedLoader(local, rank=r, world_size=world, **kw) for r in range(world)]
        b = [DistributedLoader(streamed, rank=r, world_size=world, **kw) for r in range(world)]
        for _ in range(12):
            for x, y in zip(a, b, strict=True):
                assert all((p == q).all() for p, q in zip(x.next_step(), y.next_step(), strict=True))
    streamed.close()


def test_the_cache_stays_within_its_bound_and_prefetches(dataset: Path, tmp_path: Path) -> None:
    bound = 20 * 8 * ROW_BYTES  # 20 blocks
    split = remote(dataset, tmp_path, bound)
    loader = DistributedLoader(split, rank=0, world_size=2, micro_batch=2, accumulation=1, seed=2)
    for _ in range(200):
        loader.next_step()
        assert split.cache.disk_bytes() <= bound
    split.close()
    assert 0 < split.cache.peak <= bound
    assert split.fetched > 20, "blocks came and went through the bounded cache"


def test_a_resumed_run_at_another_world_size_reads_exactly_the_rows_of_an_uninterrupted_one(
    dataset: Path, tmp_path: Path
) -> None:
    kw: dict[str, Any] = {"micro_batch": 1, "seed": 4, "weights": [2.0, 1.0]}

    def rows_of(loaders: list[DistributedLoader], steps: int) -> list[list[int]]:
        out = []
        for _ in range(steps):
            step: list[int] = []
            for ld in loaders:
                step.extend(int(r[0, 0]) * 1_000_003 + int(r[0].sum()) for b in ld.next_step() for r in [b])
            out.append(sorted(step))
        return out

    straight = [DistributedLoader(remote(dataset, tmp_path / "s", split="train"), rank=0, world_size=1,
                                  accumulation=6, **kw)]  # fmt: skip
    expected = rows_of(straight, 40)
    first = [DistributedLoader(remote(dataset, tmp_path / f"a{r}"), rank=r, world_size=2, accumulation=3, **kw)
             for r in range(2)]  # fmt: skip
    got = rows_of(first, 15)
    state = json.loads(json.dumps(first[0].state_dict()))
    then = [DistributedLoader(remote(dataset, tmp_path / f"b{r}"), rank=r, world_size=3, accumulation=2, **kw)
            for r in range(3)]  # fmt: skip
    for ld in then:
        ld.load_state_dict(state)
    got += rows_of(then, 25)
    assert got == expected


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def test_a_corrupt_block_stops_with_one_line_naming_the_shard(dataset: Path, tmp_path: Path) -> None:
    bad = copy_of(dataset, tmp_path)
    shard = bad / PackedSplit(bad, "train").shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[8 * ROW_BYTES + 3] ^= 0x01  # block 1 of the shard
    shard.write_bytes(bytes(data))
    split = remote(bad, tmp_path)
    first = int(split.layout.offsets[1])
    split.rows(np.array([first]))  # block 0 of that shard is intact
    with pytest.raises(DataError, match=rf"shard .*{shard.name} block 1 \(rows 8-15\): fails its sha256 check"):
        split.rows(np.array([first + 9]))


def test_a_missing_or_short_shard_is_named(dataset: Path, tmp_path: Path) -> None:
    bad = copy_of(dataset, tmp_path)
    shards = PackedSplit(bad, "train").shards
    (bad / shards[2]["file"]).unlink()
    short = bad / shards[3]["file"]
    short.write_bytes(short.read_bytes()[: 5 * ROW_BYTES])
    split = remote(bad, tmp_path)
    with pytest.raises(DataError, match=rf"shard .*{shards[2]['file']} block 0 \(rows 0-7\): missing"):
        split.rows(np.array([int(split.layout.offsets[2])]))
    with pytest.raises(DataError, match=rf"{shards[3]['file']} block 0 .*: 160 bytes, expected 256: truncated"):
        split.rows(np.array([int(split.layout.offsets[3])]))


def test_hostile_manifests_are_refused(dataset: Path, tmp_path: Path) -> None:
    bad = copy_of(dataset, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="leaves the dataset's folder"):
        remote(bad, tmp_path).rows(np.array([0]))
    digests = bad / (PackedSplit(dataset, "train").shards[1]["file"] + ".blocks")
    digests.write_bytes(b"\0" * len(digests.read_bytes()))
    with pytest.raises(DataError, match=r"block digests .* do not match the manifest"):
        remote(bad, tmp_path).rows(np.array([150]))
    with pytest.raises(DataError, match="no dataset manifest"):
        RemoteSplit(str(tmp_path / "nothing"), "train", tmp_path / "c", 1 << 20)
    with pytest.raises(DataError, match=r"data\.streamCache: 100 bytes"):
        remote(dataset, tmp_path, cache_bytes=100)


@pytest.mark.slow
def test_a_run_over_a_corrupt_bucket_stops_in_one_line_before_any_step(tmp_path: Path) -> None:
    """`pretrain run` streams from data.cacheUri; every training shard there damaged at its size
    (digests kept): the run ends naming the shard and block, and no step was trained."""
    from click.testing import CliRunner

    from pretrain.cli import main
    from tests.trainer_runs import TINY, run_job

    bucket = tmp_path / "bucket"
    sets = ["data.sequenceLength=32", "model.maxPositions=64", f"data.cacheUri=file://{bucket}"]
    r = CliRunner().invoke(main, ["data", "prepare", str(TINY), "--output", str(tmp_path / "prep"),
                                  *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    assert r.exit_code == 0, r.output
    for shard in bucket.glob("*/u*-train-*.bin"):
        shard.write_bytes(bytes(255 - b for b in shard.read_bytes()))
    run = run_job(tmp_path / "run", sets, nproc=1)
    assert run.proc.returncode != 0
    errors = [line for line in run.output.splitlines() if "fails its sha256 check" in line]
    assert errors and re.search(r"shard file://.*/u\d{6}-train-\d{6}\.bin block \d+ \(rows \d+-\d+\): fails its sha256 "
                                r"check \(corrupt\)", errors[0]), run.output[-3000:]  # fmt: skip
    assert not [e for e in run.log if "loss" in e], "no step trained on those bytes"
