"""Names that come from storage (object keys, manifest entries) never lead outside their folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pretrain.cli import main
from pretrain.storage.checkpoint import CheckpointStore
from pretrain.storage.fs import StorageError, download_dir
from pretrain.storage.manifest import MANIFEST, step_name
from pretrain.storage.paths import UnsafePath, inside, relative_name
from tests.s3server import S3


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\..\\b", "a\x00b", "a/b/", "../" * 12 + "tmp/x"],
)
def test_unsafe_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePath):
        relative_name(name)
    with pytest.raises(UnsafePath):
        inside(tmp_path, name)


def test_plain_names_pass_and_symlinks_out_are_caught(tmp_path: Path) -> None:
    assert inside(tmp_path, "sub/dir/file.bin") == tmp_path / "sub" / "dir" / "file.bin"
    assert inside(tmp_path, "..hidden/x..y") == tmp_path / "..hidden" / "x..y", "dots inside names are names"
    outside = tmp_path.parent / f"outside-{os.urandom(3).hex()}"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(UnsafePath, match="symbolic link"):
        inside(tmp_path, "link/file")


def test_a_bucket_key_with_dot_dot_segments_cannot_write_outside_the_model_folder(s3: S3, tmp_path: Path) -> None:
    """The issue's reproduction: `pretrain generate --model s3://.../a/final` over a bucket holding a
    key made of `../` segments and an absolute location."""
    bucket = s3.bucket(f"hostile-{os.urandom(3).hex()}")
    victim = tmp_path / "victim.txt"
    client = s3.client()
    client.put_object(Bucket=bucket, Key="a/final/config.json", Body=b"{}")  # type: ignore[attr-defined]
    evil = "a/final/" + "../" * 12 + str(victim).lstrip("/")
    client.put_object(Bucket=bucket, Key=evil, Body=b"owned")  # type: ignore[attr-defined]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    assert evil in keys, "the store kept the key as written (the attack is real)"
    with pytest.raises(StorageError, match=r"object key .*'\.\.' segment"):
        download_dir(f"s3://{bucket}/a/final", tmp_path / "model")
    assert not victim.exists()
    result = CliRunner().invoke(main, ["generate", "--model", f"s3://{bucket}/a/final", "--prompt", "x"])
    assert result.exit_code == 1 and not victim.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'..' segment" in lines[0], result.output


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_manifest_entry_leading_outside_makes_the_checkpoint_unusable(where: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:  # fmt: skip
    if where == "local":
        uri = str(tmp_path / "ckpt")
    else:
        s3: S3 = request.getfixturevalue("s3")
        uri = f"s3://{s3.bucket(f'm-{os.urandom(3).hex()}')}/run"
    store = CheckpointStore(uri, workdir=tmp_path / "work", keep_last=3, retry_base_delay=0.05)
    for step in (10, 20):
        d = store.staging_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.pt").write_bytes(os.urandom(64))
        store.commit(step, writes_manifest=True, uploads=True, meta={"world_size": 1}, background=False)
    victim = tmp_path / "escaped.txt"
    manifest_key = f"{store.root}/{step_name(20)}/{MANIFEST}"
    m = json.loads(store.fs.cat_file(manifest_key))
    rel = "../" * 12 + str(victim).lstrip("/")
    m["files"][rel] = m["files"]["model.pt"]
    store.fs.pipe_file(manifest_key, json.dumps(m).encode())
    into = tmp_path / "restore"
    problem = store.verify(20, into=into)
    assert problem is not None and "'..' segment" in problem
    assert not victim.exists()
    step, notes = store.select("auto")
    assert step == 10 and "'..' segment" in notes[0], "resume falls back to the last good checkpoint"
    assert not victim.exists()
