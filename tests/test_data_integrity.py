"""Prepared data is verified where it is reused (issue 33, item 3)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pretrain.cli import main
from pretrain.data.loader import PackedSplit
from pretrain.data.prepare import check_prepared
from pretrain.data.sources import DataError
from tests.conftest import ROOT

TINY = str(ROOT / "examples" / "tiny-cpu.yaml")
#: A small corpus: the first 60 kB of the example's text, so each preparation takes a second.
SMALL = ["--set", "data.sequenceLength=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    text = (ROOT / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt").read_bytes()[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(text)
    return [*SMALL, "--set", f"data.sources.0.uri={path}"]


def prepare(out: Path, corpus: list[str], *more: str) -> tuple[int, str, Path]:
    r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(out), *corpus, *more])
    return r.exit_code, r.output, next(out.glob("*/manifest.json")).parent


def first_train_shard(folder: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    m = json.loads((folder / "manifest.json").read_text())
    entry = m["splits"]["train"]["shards"][0]
    return folder / entry["file"], entry


def test_a_truncated_shard_is_rebuilt(tmp_path: Path, corpus: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Before: with a training shard cut to a third, `data prepare` exited 0 and reported the
    counts without rebuilding."""
    code, first, folder = prepare(tmp_path, corpus)
    assert code == 0, first
    shard, _ = first_train_shard(folder)
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 3])
    assert "expected" in (check_prepared(folder) or "")
    code, again, _ = prepare(tmp_path, corpus)
    assert code == 0, again
    assert "is damaged (shard u000000-train-000000.bin is" in caplog.text and "preparing it again" in caplog.text
    assert shard.read_bytes() == whole and check_prepared(folder) is None
    assert again.split(" in ")[0] == first.split(" in ")[0], "the same counts"


def test_a_shard_rewritten_at_the_same_size_is_caught(tmp_path: Path, corpus: list[str]) -> None:
    """Before: a shard overwritten at its size with out-of-vocabulary ids made the trainer die
    with `IndexError: index out of range in self`, naming no shard."""
    _, _, folder = prepare(tmp_path, corpus)
    shard, entry = first_train_shard(folder)
    whole = shard.read_bytes()
    shard.write_bytes(b"\xff" * len(whole))  # id 65535 everywhere, beyond the example's character vocabulary
    assert check_prepared(folder) == "shard u000000-train-000000.bin fails its sha256 check"
    # A forged manifest (its checksum made to match) still never reaches the model: reading refuses.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    split = PackedSplit(folder, "train")
    with pytest.raises(DataError, match=rf"shard {shard}: token id 65535 is not below the vocabulary \(\d+\): corrupt"):
        split.rows(np.arange(4))
    # And `data prepare` rebuilds the damaged shard (its record of the last check no longer fits).
    os.utime(shard, ns=(1, 1))
    manifest["splits"]["train"]["shards"][0]["sha256"] = entry["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = prepare(tmp_path, corpus)
    assert code == 0 and shard.read_bytes() == whole, out


def test_a_damaged_shard_in_the_shared_cache_fails_in_one_line(tmp_path: Path, corpus: list[str]) -> None:
    remote = tmp_path / "bucket"
    cache = ["--set", f"data.cacheUri=file://{remote}"]
    code, out, _ = prepare(tmp_path / "first", corpus, *cache)
    assert code == 0, out
    published = next(remote.glob("*/manifest.json")).parent
    shard, _ = first_train_shard(published)
    shard.write_bytes(shard.read_bytes()[:-2] + b"\xff\xff")
    r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path / "second"), *corpus, *cache])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0] == (f"error: data.cacheUri file://{published}: shard u000000-train-000000.bin fails its sha256 check; "
                        f"never trained on: delete file://{published} to prepare it again")  # fmt: skip
    assert not list((tmp_path / "second").glob("*/manifest.json")), "nothing damaged was kept"
    shutil.rmtree(published)
    code, out, _ = prepare(tmp_path / "second", corpus, *cache)
    assert code == 0, out
