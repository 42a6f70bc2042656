"""Data at corpus scale, part 2: ranks stream a dataset prepared in S3 (issue 28 item 2).

    python bench/data_stream.py [--small-mb 16] [--large-mb 512] [--repeats 5] [--steady-only]

Two prepared datasets (random token ids at sequence length 1024, uint16, written by the
project's own ShardWriter in shards of 32 MiB with their block digests) lie in a moto S3 server
on loopback. A fresh process then does what a rank does before its first step and the step's
read: open the split, build the loader (rank 0 of 2, micro-batch 8, accumulation 2), take one
step. Measured per dataset: seconds to that first step, and the node-local bytes it left.

Baseline: today's path before streaming: download the dataset folder (as `prepare_cached` did),
check every shard's sha256, memory-map it. Candidate: `RemoteSplit` through a 256 MiB cache.
Rounds interleave small/large and baseline/candidate; medians. Target: large / small <= 1.2 for
both time and bytes, for the candidate.

Then the streamed loader's rate (tokens/s over 20 s from a cold cache, through a 128 MiB cache
so blocks come and go) against what the tiny trainer consumes (bench/data_loader.py's measurement), and the
cache's peak bytes against its bound. Target: >= 20x; peak <= bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loader import trainer_rate

SEQ = 1024
SHARD_ROWS = 16384  # 32 MiB of uint16 rows
TINY_SEQ = 128  # examples/tiny-cpu.yaml, whose consumption data_loader.trainer_rate measures

FIRST_STEP = r"""
import json, sys, time, shutil
from pathlib import Path
t0 = time.perf_counter()
from pretrain.data.loader import DistributedLoader, PackedSplit
mode, uri, local, seconds, bound = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
if mode == "stream":
    from pretrain.data.stream import RemoteSplit
    split = RemoteSplit(uri, "train", local / "cache", bound)
else:
    from pretrain.data.prepare import check_prepared
    from pretrain.storage.fs import download_dir
    path = download_dir(uri, local / "dataset", into=True)
    assert check_prepared(path) is None
    split = PackedSplit(path, "train")
loader = DistributedLoader(split, rank=0, world_size=2, micro_batch=8, accumulation=2, seed=1)
loader.next_step()
first = time.perf_counter() - t0
local_bytes = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
rows, t1 = 0, time.perf_counter()
while time.perf_counter() - t1 < seconds:
    rows += sum(len(b) for b in loader.next_step())
rate = rows / (time.perf_counter() - t1) if seconds else 0.0
peak = split.cache.peak if mode == "stream" else 0
fetched = split.fetched if mode == "stream" else 0
if mode == "stream":
    split.close()
print(json.dumps({"first": first, "bytes": local_bytes, "rate": rate, "peak": peak, "fetched": fetched, "rows": rows}))
"""


def write_dataset(root: Path, mb: int) -> Path:
    """A prepared dataset of `mb` MiB of training rows (and one validation shard)."""
    from pretrain.data.parts import ShardWriter
    from pretrain.data.units import FORMAT_VERSION, block_rows_for

    out = root / f"ds-{mb}"
    out.mkdir(parents=True)
    dtype, bound = np.dtype(np.uint16), 32768
    block_rows = block_rows_for(SEQ, dtype)
    rng = np.random.default_rng(mb)
    splits = {}
    for name, rows in (("train", mb * 2**20 // (SEQ * 2)), ("val", 64)):
        writer = ShardWriter(out, f"u000000-{name}", dtype, SHARD_ROWS, bound, block_rows)
        for start in range(0, rows, 4096):
            writer.write(rng.integers(0, bound, (min(4096, rows - start), SEQ), dtype=np.uint16), 0)
        shards = [vars(s) for s in writer.close()]
        splits[name] = {"rows": rows, "tokens": rows * SEQ, "shards": shards}
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": f"bench{mb}", "sequence_length": SEQ,
                "dtype": "uint16", "vocab_size": bound, "block_rows": block_rows, "splits": splits}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def measure(mode: str, uri: str, tmp: Path, seconds: float, bound: int) -> dict[str, float]:
    local = Path(tempfile.mkdtemp(dir=tmp, prefix=f"node-{mode}-"))
    args = [sys.executable, "-c", FIRST_STEP, mode, uri, str(local), str(seconds), str(bound)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    subprocess.run(["rm", "-rf", str(local)], check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-mb", type=int, default=16)
    ap.add_argument("--large-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steady-only", action="store_true", help="Only the loader's rate (skip the first-step rounds).")
    args = ap.parse_args()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    import fsspec

    from pretrain.storage.fs import upload_dir

    fsspec.filesystem("s3").mkdir("bench")
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    uris = {}
    for mb in (args.small_mb, args.large_mb):
        local = write_dataset(tmp, mb)
        uris[mb] = f"s3://bench/ds-{mb}"
        upload_dir(local, uris[mb], last="manifest.json")
        subprocess.run(["rm", "-rf", str(local)], check=True)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(0 if args.steady_only else args.repeats):
        for mode in ("download", "stream"):
            for mb in (args.small_mb, args.large_mb):
                results.setdefault((mode, mb), []).append(measure(mode, uris[mb], tmp, 0, 256 << 20))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first", "bytes")} for k, v in results.items()}
    for mode in ("download", "stream") if results else ():
        s, big = med[(mode, args.small_mb)], med[(mode, args.large_mb)]
        print(f"{mode:>8}: first step {s['first']:.2f} s at {args.small_mb} MiB, {big['first']:.2f} s at "
              f"{args.large_mb} MiB (ratio {big['first'] / s['first']:.2f}); node-local bytes {s['bytes'] / 2**20:.1f} "
              f"MiB and {big['bytes'] / 2**20:.1f} MiB (ratio {big['bytes'] / s['bytes']:.2f})")  # fmt: skip
    bound = 128 << 20  # two windows of 256 blocks of 256 KiB; the product's default is 4Gi per node
    steady = [measure("stream", uris[args.large_mb], tmp, 20.0, bound) for _ in range(2)]
    rate = statistics.median(r["rate"] for r in steady) * SEQ
    consume = trainer_rate(tmp) * TINY_SEQ
    peak = max(r["peak"] for r in steady)
    per_row = statistics.median(r["fetched"] / r["rows"] for r in steady)
    per_second = statistics.median(r["fetched"] / 20.0 for r in steady)
    print(f"streamed loader from S3: {rate:,.0f} tokens/s over 20 s from a cold cache (rank 0 of 2); the tiny trainer consumes {consume:,.0f} "
          f"tokens/s (2 processes) -> ratio {rate / consume:.0f}x; cache peak {peak / 2**20:.1f} MiB of a "
          f"{bound / 2**20:.0f} MiB bound")  # fmt: skip
    print(f"storage requests: {per_second:.0f}/s at that rate, {1000 * per_row:.1f} per 1000 rows read (one ranged "
          f"read per block fetched; at most one per row by construction)")  # fmt: skip
    server.stop()


if __name__ == "__main__":
    main()
