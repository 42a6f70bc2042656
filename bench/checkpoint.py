"""Checkpoint store against a local S3 protocol server (moto), in one run:

1. save throughput (MB/s) of CheckpointStore.commit vs a raw s3fs put of the same files;
2. training-step stall during an asynchronous save vs a synchronous one (a CPU-bound stand-in
   step of fixed work; the stall is the extra step time while a save runs).

    python bench/checkpoint.py [--mb 200] [--repeats 5]

Targets: store/raw >= 0.8; async stall < 20% of the synchronous save time.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=200, help="checkpoint size in MB (8 files)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import boto3
    import numpy as np
    import s3fs
    from moto.server import ThreadedMotoServer

    from pretrain.storage.checkpoint import CheckpointStore

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": url}}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")  # fmt: skip
    fs = s3fs.S3FileSystem(**opts)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    store = CheckpointStore("s3://bench/store", workdir=tmp / "w", storage_options=opts, keep_last=1)
    per_file = args.mb * 2**20 // 8

    def write_files(step: int) -> Path:
        d = store.staging_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            (d / f"shard-{i}.pt").write_bytes(os.urandom(per_file))
        return d

    raw, ours = [], []
    step = 0
    for _ in range(args.repeats):
        step += 1
        d = write_files(step)
        t0 = time.perf_counter()
        for f in sorted(d.iterdir()):
            fs.put_file(str(f), f"bench/raw/{step}/{f.name}")
        raw.append(args.mb / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        store.commit(step, writes_manifest=True, uploads=True, meta={}, background=False)
        ours.append(args.mb / (time.perf_counter() - t0))
        print(
            f"  repeat: raw s3fs {raw[-1]:.0f} MB/s, store {ours[-1]:.0f} MB/s (hash + upload + manifest)", flush=True
        )
    print(f"save throughput: store/raw = {statistics.median(ours) / statistics.median(raw):.2f} "
          f"(median {statistics.median(ours):.0f} vs {statistics.median(raw):.0f} MB/s)")  # fmt: skip

    work = np.random.default_rng(0).random((384, 384))

    def train_step() -> float:
        t0 = time.perf_counter()
        for _ in range(20):
            work @ work
        return time.perf_counter() - t0

    base = [train_step() for _ in range(30)]
    sync_times, stalls = [], []
    for _ in range(args.repeats):
        step += 1
        write_files(step)
        t0 = time.perf_counter()
        store.commit(step, writes_manifest=True, uploads=True, meta={}, background=False)
        sync_times.append(time.perf_counter() - t0)
        step += 1
        write_files(step)
        t0 = time.perf_counter()
        store.commit(step, writes_manifest=True, uploads=True, meta={}, background=True)
        times = []
        while store._inflight is not None and not store._inflight.done():
            times.append(train_step())
        store.wait()
        elapsed = time.perf_counter() - t0
        extra = sum(times) - len(times) * statistics.median(base)
        stalls.append(max(extra, 0.0) + (elapsed - sum(times) if not times else 0.0))
        print(f"  repeat: sync save {sync_times[-1]:.2f}s; during async save {len(times)} steps, "
              f"stall {stalls[-1]:.3f}s", flush=True)  # fmt: skip
    ratio = statistics.median(stalls) / statistics.median(sync_times)
    print(f"async stall / sync save = {ratio:.2f} (median stall {statistics.median(stalls):.2f}s, "
          f"sync {statistics.median(sync_times):.2f}s)")  # fmt: skip
    store.close()
    srv.stop()


if __name__ == "__main__":
    main()
