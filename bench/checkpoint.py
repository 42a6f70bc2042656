"""Checkpoint store against a local S3 protocol server (moto), in one run:

1. save throughput (MB/s) of CheckpointStore.commit vs a raw s3fs put of the same files;
2. training-step stall during an asynchronous save vs a synchronous one: the time the loop loses
   while a save runs, for two stand-in steps: "device" (the host mostly waits on an accelerator,
   as in GPU training: 45 ms wait + 5 ms of host work) and "cpu" (all host compute; the worst
   case on a 2-core machine, where upload and training share both cores).

The S3 server (moto) runs in its own process, as a store would.

    python bench/checkpoint.py [--mb 200] [--repeats 5]

Targets: store/raw >= 0.8; async stall < 20% of the synchronous save time.
"""

from __future__ import annotations

import argparse
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
    import socket
    import subprocess
    import sys
    import urllib.request

    import boto3
    import numpy as np
    import s3fs

    from pretrain.storage.checkpoint import CheckpointStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
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

    def cpu_step() -> None:
        for _ in range(20):
            work @ work

    def device_step() -> None:
        time.sleep(0.045)  # the host waits on the accelerator
        for _ in range(2):
            work @ work

    for kind, train_step in (("device", device_step), ("cpu", cpu_step)):

        def timed(train_step=train_step) -> float:  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            train_step()
            return time.perf_counter() - t0

        base = statistics.median(timed() for _ in range(30))
        sync_stall, async_stall = [], []
        for _ in range(args.repeats):
            step += 1
            write_files(step)
            t0 = time.perf_counter()
            store.commit(step, writes_manifest=True, uploads=True, meta={}, background=False)
            sync_stall.append(time.perf_counter() - t0)  # the loop waits for the whole save
            step += 1
            write_files(step)
            t0 = time.perf_counter()
            store.commit(step, writes_manifest=True, uploads=True, meta={}, background=True)
            n = 0
            while store._inflight is not None and not store._inflight.done():
                timed()
                n += 1
            elapsed = time.perf_counter() - t0
            store.wait()
            async_stall.append(max(0.0, elapsed - n * base))  # time lost vs the same steps undisturbed
        ratio = statistics.median(async_stall) / statistics.median(sync_stall)
        print(
            f"{kind} step ({base * 1e3:.0f} ms): async stall / sync save = {ratio:.2f} "
            f"(median stall {statistics.median(async_stall):.2f}s vs {statistics.median(sync_stall):.2f}s)",
            flush=True,
        )
    store.close()
    server.terminate()


if __name__ == "__main__":
    main()
