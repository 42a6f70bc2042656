"""The data and checkpoint commands as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pretrain.cli import main
from pretrain.storage.checkpoint import CheckpointStore
from tests.conftest import ROOT
from tests.s3server import S3

TINY = str(ROOT / "examples" / "tiny-cpu.yaml")


def test_data_prepare_then_reuse(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    r1 = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(out)])
    assert r1.exit_code == 0, r1.output
    assert "training and" in r1.stdout and "sequences of 128 tokens" in r1.stdout
    manifest = next(out.glob("*/manifest.json"))
    before = manifest.stat().st_mtime_ns
    r2 = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(out)])
    assert r2.exit_code == 0 and manifest.stat().st_mtime_ns == before, "unchanged inputs reuse the shards"
    r3 = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(out), "--set", "data.sequenceLength=64"])
    assert r3.exit_code == 0 and len(list(out.glob("*/manifest.json"))) == 2


def test_data_prepare_in_parts_on_several_machines_then_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28 item 1: `--index k --count n` on n machines (here, n runs into one shared folder),
    then `--commit`: the same dataset as one `pretrain data prepare --workers 2`."""
    from pretrain.data import units

    monkeypatch.setattr(units, "UNIT_BYTES", 20_000)  # units of 20 kB, not 64 MiB
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * (1 + i % 9)}) + "\n" for i in range(3000)))
    sets = ["--set", f"data.sources.0.uri={corpus}", "--set", "tokenizer.type=bytes"]
    shared = tmp_path / "shared"
    n_units = -(-corpus.stat().st_size // 20_000)
    for k in (1, 0, 2):
        r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(shared), "--index", str(k),
                                      "--count", "3", *sets])  # fmt: skip
        assert r.exit_code == 0 and f"part {k} of 3: {len(range(k, n_units, 3))} units" in r.stdout, r.output
    early = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path / "x"), "--commit",
                                      "--count", "3", *sets])  # fmt: skip
    assert early.exit_code == 1 and "part-00000-of-00003.json: this part is missing" in early.stderr
    r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(shared), "--commit", "--count", "3", *sets])
    assert r.exit_code == 0, r.output
    parted = json.loads(next(shared.glob("*/manifest.json")).read_text())
    assert parted["units"] == n_units > 10 and parted["parts"] == 3
    at_once = tmp_path / "at-once"
    r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(at_once), "--workers", "2", *sets])
    assert r.exit_code == 0, r.output
    assert json.loads(next(at_once.glob("*/manifest.json")).read_text()) == {**parted, "parts": 2}
    bad = CliRunner().invoke(main, ["data", "prepare", TINY, "--index", "0", *sets])
    assert (
        bad.exit_code == 1 and bad.stderr.strip() == "error: --index and --commit need --count (the number of workers)"
    )


def test_data_prepare_in_parts_into_a_bucket(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With data.cacheUri, each machine writes its part straight into the bucket (shards, then its
    part manifest), `--commit` writes the dataset manifest last, and any later prepare (or the
    trainer) takes the dataset from there, verified."""
    from pretrain.data import units

    monkeypatch.setattr(units, "UNIT_BYTES", 20_000)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} " * (1 + i % 7)}) + "\n" for i in range(2500)))
    bucket = s3.bucket(f"parts-{os.urandom(3).hex()}")
    sets = ["--set", f"data.sources.0.uri={corpus}", "--set", "tokenizer.type=bytes",
            "--set", f"data.cacheUri=s3://{bucket}/cache"]  # fmt: skip

    def prepare(machine: str, *args: str) -> str:
        r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path / machine), *args, *sets])
        assert r.exit_code == 0, r.output
        return str(r.stdout)

    for k, present in ((2, 1), (0, 2)):
        out = prepare(f"m{k}", "--index", str(k), "--count", "3")
        assert f"part {k} of 3:" in out and f"{present} of 3 parts written; the last worker" in out, out
    assert "(already there: kept)" in prepare("m2b", "--index", "2", "--count", "3"), "a retried worker redoes nothing"
    early = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path / "c"), "--commit",
                                      "--count", "3", *sets])  # fmt: skip
    assert early.exit_code == 1 and "/parts/part-00001-of-00003.json: this part is missing" in early.stderr, (
        early.output
    )
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    assert not [k for k in keys if k.endswith("/manifest.json")], "no dataset before the commit"
    last = prepare("m1", "--index", "1", "--count", "3")
    assert "(already there: kept)" not in last and "committed, " in last, "the last worker to finish commits"
    # a worker retried (a pod restarted) once the dataset is there: nothing to do
    assert "already prepared, nothing to do" in prepare("m1b", "--index", "1", "--count", "3")
    committed = prepare("c", "--commit", "--count", "3")  # an explicit commit writes the same manifest
    assert f"{bucket}/cache/" in committed and "training and" in committed
    fresh = prepare("fresh")  # a new machine: the dataset comes from the bucket, verified
    local = json.loads(next((tmp_path / "fresh").glob("*/manifest.json")).read_text())
    assert local["parts"] == 3 and local["units"] == -(-corpus.stat().st_size // 20_000)
    assert list((tmp_path / "fresh").glob("*/u000000-train-000000.bin")), fresh
    at_once = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path / "once"),
                                        *sets[:4]])  # fmt: skip
    assert at_once.exit_code == 0, at_once.output
    once = json.loads(next((tmp_path / "once").glob("*/manifest.json")).read_text())
    assert once["splits"] == local["splits"], "the same rows however they were made"


def test_data_prepare_bad_source_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["data", "prepare", TINY, "--output", str(tmp_path), "--set",
                                  f"data.sources.0.uri={tmp_path}/nothing-*.txt"])  # fmt: skip
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "matches no files" in r.stderr and "nothing-*.txt" in r.stderr


def test_tokenizer_train_saves_a_loadable_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    r = CliRunner().invoke(main, ["tokenizer", "train", TINY, "--vocab-size", "500", "--output", str(out),
                                  "--set", "tokenizer.sampleBytes=200000"])  # fmt: skip
    assert r.exit_code == 0, r.output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 500
    text = "ROMEO: Is the day so young?"
    assert tok.decode(tok.encode(text)) == text


def test_checkpoints_list_and_verify(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    store = CheckpointStore(uri, workdir=tmp_path / "w", keep_last=5)
    for step in (10, 20):
        d = store.staging_dir(step)
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(os.urandom(1000))
        store.commit(step, writes_manifest=True, uploads=True, meta={}, background=False)
    (Path(uri) / "step-00000030").mkdir()
    r = CliRunner().invoke(main, ["checkpoints", "list", uri])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert "complete" in lines[1] and "complete" in lines[2] and "incomplete" in lines[3]
    ok = CliRunner().invoke(main, ["checkpoints", "verify", uri, "--step", "20"])
    assert ok.exit_code == 0 and "step-00000020: ok" in ok.stdout
    # a save that did not finish (kill -9 mid-save) is reported, not a failure, unless --strict
    crashed = CliRunner().invoke(main, ["checkpoints", "verify", uri])
    assert crashed.exit_code == 0, crashed.output
    assert "step-00000030: incomplete" in crashed.stdout and "resume takes step-00000020" in crashed.stdout
    assert CliRunner().invoke(main, ["checkpoints", "verify", uri, "--strict"]).exit_code == 1
    data = bytearray((Path(uri) / "step-00000020" / "model.pt").read_bytes())
    data[0] ^= 1
    (Path(uri) / "step-00000020" / "model.pt").write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["checkpoints", "verify", uri, "--step", "20"])
    assert bad.exit_code == 1 and "fails its sha256 check" in bad.stdout
    newest_bad = CliRunner().invoke(main, ["checkpoints", "verify", uri])
    assert newest_bad.exit_code == 1 and "resume takes step-00000010" in newest_bad.stdout
    manifest = json.loads((Path(uri) / "step-00000010" / "manifest.json").read_text())
    assert manifest["files"]["model.pt"]["size"] == 1000


def test_wrong_credentials_are_one_line(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`checkpoints list|verify` and `generate` against a bucket the credentials cannot read."""
    bucket = s3.bucket(f"private-{os.urandom(3).hex()}")
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems: this one must see the bad endpoint
    monkeypatch.setattr(s3fs.S3FileSystem, "cachable", False)
    for args in (["checkpoints", "list", f"s3://{bucket}/x"], ["checkpoints", "verify", f"s3://{bucket}/x"],
                 ["generate", "--model", f"s3://{bucket}/x/final", "--prompt", "a"]):  # fmt: skip
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.output


def test_torchruns_failure_report_is_kept_from_the_screen() -> None:
    """The report filter passes log lines and a live progress bar through, and keeps tracebacks,
    elastic error lines and the ChildFailedError banner for the log file (or --verbose)."""
    from pretrain.runlog import ReportFilter

    shown: list[bytes] = []
    kept: list[bytes] = []
    f = ReportFilter(shown.append, kept.append)
    f.feed(b"[rank 0] step 1 loss 5.5\n\rtrain:  10%|#")
    assert b"".join(shown).endswith(b"\rtrain:  10%|#"), "a progress bar is shown before its line ends"
    f.feed(b"         | 1/10\n")
    report = (
        b"[rank 0] error: data.sources[0]: too little text\n"
        b"E1129 06:00:00.123000 1234 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1)\n"
        b'Traceback (most recent call last):\n  File "torchrun", line 8, in <module>\n    sys.exit(main())\n'
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        b"============================================================\npretrain.trainer FAILED\n"
        b"------------------------------------------------------------\nRoot Cause (first observed failure):\n"
        b"============================================================\n"
    )
    f.feed(report[:50])
    f.feed(report[50:])
    f.feed(b"run folder done\n")
    f.close()
    text = b"".join(shown).decode()
    assert "too little text" in text and "run folder done" in text and "step 1 loss" in text
    assert "Traceback" not in text and "ChildFailedError" not in text and "E1129" not in text
    assert "Root Cause" not in text and "=====" not in text
    assert f.hidden == 10
    assert b"".join(kept).endswith(report + b"run folder done\n"), "the log keeps everything"
    loud: list[bytes] = []
    v = ReportFilter(loud.append, lambda b: None, verbose=True)
    v.feed(report)
    v.close()
    assert b"".join(loud) == report


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [("--max-new-tokens", "1000000000", "1<=x<=100000"), ("--temperature", "nan", "nan is not a finite number"),
     ("--temperature", "inf", "0.0<=x<=100.0"), ("--top-p", "nan", "nan is not a finite number"),
     ("--top-p", "0", "0.0<x<=1.0"), ("--num-samples", "100000", "1<=x<=256")],
)  # fmt: skip
def test_generate_refuses_unbounded_or_meaningless_sampling(option: str, value: str, says: str) -> None:
    """Issue 33 item 5: `--max-new-tokens 1000000000` ran until killed, `--temperature nan`
    exited 0 printing spaces. Refused before any model is read."""
    result = CliRunner().invoke(main, ["generate", "--model", "/no/such/model", option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and says in result.output, result.output


def test_validate_warns_when_checkpoints_would_stay_in_the_pod() -> None:
    ok = CliRunner().invoke(main, ["validate", TINY])
    assert ok.exit_code == 0, ok.output
    assert ok.stderr.strip() == (f"warning: {TINY}: spec.checkpoint.uri is not set: on a cluster the checkpoints stay "
                                 "in the pod's emptyDir, and a restarted, resized or resumed job starts again from "
                                 "step 0 (`pretrain run` keeps them in its run folder)")  # fmt: skip
    stored = CliRunner().invoke(main, ["validate", TINY, "--set", "checkpoint.uri=s3://b/ck"])
    assert stored.exit_code == 0 and stored.stderr == "", stored.output
