"""Data at corpus scale, part 1: preparation spread over workers (issue 28).

    python bench/data_scale.py [--mb 48] [--unit-mb 2] [--repeats 3] [--workers 2]

The corpus is Tiny Shakespeare repeated to --mb megabytes as JSONL documents of ~40 lines, with
--novel of the words of each copy made new (bench/data_prepare.py: a plain repeat would let one
worker's piece cache, warm from the copies before, flatter the single worker), cut
into units of --unit-mb (the product's default is 64 MiB; smaller here so that a small corpus
has several). The tokenizer is a byte-level BPE (8192) trained on the original text.

Baseline: one worker prepares every unit (one process, encoding on one core). Candidate:
--workers workers, each a process encoding on one core, prepare their shares at once, as the
pods of an Indexed Job would; then the commit. Rounds interleave baseline and candidate; the
ratio is of medians. Each round also measures the machine's own ceiling: the same number of
processes doing pure arithmetic, over one. Also printed: the per-worker rate in tokens/s and, from it, the time the
flagship example's 100B tokens would take per number of pods (one core per pod, perfect scaling:
an estimate, not a measurement). Target: ratio >= 1.8 for 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prepare import novel_words  # the same corpus as the tokenizer benchmark

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data import units
from pretrain.data.parts import commit, prepare_part
from pretrain.data.tokenizer import fingerprint, train_bpe
from pretrain.data.units import resolve_inputs

CORPUS = Path(__file__).resolve().parents[1] / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt"
FLAGSHIP_TOKENS = 100e9


def _part(args: tuple[DataSpec, Any, Path, int, int, int]) -> float:
    spec, tok, out, index, count, unit_bytes = args
    units.UNIT_BYTES = unit_bytes
    t0 = time.perf_counter()
    prepare_part(spec, tok, resolve_inputs(spec, fingerprint(tok)), out, index, count, encode_workers=1)
    return time.perf_counter() - t0


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def machine_ceiling(workers: int, n: int = 10_000_000) -> float:
    """What this machine gives `workers` processes of pure arithmetic over one: the ceiling
    for any parallel preparation here (two vCPUs may share a physical core)."""
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        list(pool.map(_spin, [n * workers]))
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_spin, [n] * workers))
    return one / (time.perf_counter() - t0)


def run(spec: DataSpec, tok: Any, out: Path, workers: int, unit_bytes: int) -> tuple[float, int]:
    """Seconds for `workers` processes to prepare every part, and the tokens made."""
    shutil.rmtree(out, ignore_errors=True)
    jobs = [(spec, tok, out, k, workers, unit_bytes) for k in range(workers)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_part, jobs))
    manifest = commit(spec, resolve_inputs(spec, fingerprint(tok)), out, workers, fingerprint(tok))
    return time.perf_counter() - t0, int(manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=48)
    p.add_argument("--unit-mb", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--novel", type=float, default=0.02, help="fraction of words made new in each copy")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    text = CORPUS.read_text()
    copies = [text] + [novel_words(text, args.novel, k) for k in range(1, args.mb * 2**20 // len(text) + 1)]
    lines = "".join(copies).splitlines(keepends=True)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": "".join(lines[i : i + 40])}) + "\n" for i in range(0, len(lines), 40))
    )
    unit_bytes = args.unit_mb << 20
    units.UNIT_BYTES = unit_bytes
    tok = train_bpe([text], 8192)
    spec = DataSpec(sources=[DataSourceSpec(uri=str(corpus))], sequence_length=1024, validation_split=0.0)
    n_units = len(units.plan_units(spec, resolve_inputs(spec, fingerprint(tok))))
    print(f"corpus {corpus.stat().st_size / 2**20:.0f} MiB in {n_units} units of {args.unit_mb} MiB")
    base, cand, ceilings, tokens = [], [], [], 0
    for r in range(args.repeats):
        b, tokens = run(spec, tok, tmp / "one", 1, unit_bytes)
        c, _ = run(spec, tok, tmp / "many", args.workers, unit_bytes)
        ceilings.append(machine_ceiling(args.workers))
        base.append(b)
        cand.append(c)
        print(f"round {r + 1}: 1 worker {b:.2f}s, {args.workers} workers {c:.2f}s, machine ceiling {ceilings[-1]:.2f}")
    b, c, ceiling = statistics.median(base), statistics.median(cand), statistics.median(ceilings)
    rate = tokens / b
    print(
        f"median: 1 worker {b:.2f}s, {args.workers} workers {c:.2f}s: ratio {b / c:.2f} (target >= 1.8 for 2); "
        f"this machine's ceiling {ceiling:.2f} (pure arithmetic, same processes): {b / c / ceiling:.2f} of it"
    )
    print(f"per-worker rate {rate / 1e6:.2f}M tokens/s (one core); {FLAGSHIP_TOKENS / 1e9:.0f}B tokens would take:")
    for pods in (1, 16, 64, 256):
        print(f"  {pods:4d} pods: {FLAGSHIP_TOKENS / rate / pods / 3600:8.1f} h")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
