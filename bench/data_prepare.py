"""Tokens/s of `pretrain data prepare` vs a plain `datasets.map` with the same fast tokenizer and
num_proc equal to the core count, in one run, interleaved.

    python bench/data_prepare.py [--mb 20] [--repeats 3] [--novel 0.02] [--unicode]

The corpus is Tiny Shakespeare repeated to --mb megabytes, cut into documents of ~40 lines, with
a fraction --novel of the words of every copy after the first turned into words never seen before
(so that, as in real corpora, the vocabulary keeps growing: the candidate caches pieces, and a
plain repeat would flatter it). The tokenizer is a byte-level BPE (8192) trained on the original.
The candidate also reads the JSONL, packs and writes shards; the baseline only tokenizes an
already loaded dataset. --unicode makes every document non-ASCII (the candidate splits ASCII
documents with the faster `re`). Target: 1.5x or better.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import fingerprint, train_bpe

CORPUS = Path(__file__).resolve().parents[1] / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt"


def novel_words(text: str, fraction: float, copy: int) -> str:
    """`text` with about `fraction` of its words given a suffix unique to this copy and word."""
    rng = random.Random(copy)
    counter = itertools.count()

    def change(m: re.Match[str]) -> str:
        if rng.random() >= fraction:
            return m.group(0)
        n, suffix = copy * 1_000_003 + next(counter), ""
        while n:
            n, r = divmod(n, 26)
            suffix += chr(ord("a") + r)
        return m.group(0) + suffix

    return re.sub(r"[A-Za-z]+", change, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--novel", type=float, default=0.02, help="fraction of words made new in each copy")
    p.add_argument("--unicode", action="store_true", help="typographic apostrophes: no document is ASCII")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    text = CORPUS.read_text()
    if args.unicode:
        text = text.replace("'", "\u2019")
    copies = [text] + [novel_words(text, args.novel, k) for k in range(1, args.mb * 2**20 // len(text) + 1)]
    lines = "".join(copies).splitlines(keepends=True)
    docs = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    corpus = tmp / "corpus.jsonl"
    import json

    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = train_bpe([text], 8192)
    spec = DataSpec(sources=[DataSourceSpec(uri=str(corpus))], sequence_length=1024, validation_split=0.0)
    cores = os.cpu_count() or 1

    import datasets

    datasets.disable_progress_bars()

    def baseline() -> tuple[float, int]:
        ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(tmp / "hf-cache"))
        t0 = time.perf_counter()
        out = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=cores,
                     remove_columns=["text"], load_from_cache_file=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for x in out["input_ids"])
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        return seconds, tokens

    def candidate() -> tuple[float, int]:
        cache = tmp / "prep"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        path = prepare(spec, tok, fingerprint(tok), cache)
        seconds = time.perf_counter() - t0
        m = json.loads((path / "manifest.json").read_text())
        return seconds, m["splits"]["train"]["tokens"]

    base, cand = [], []
    for i in range(args.repeats):
        s, n = baseline()
        base.append(n / s)
        s, n = candidate()
        cand.append(n / s)
        print(
            f"  repeat {i + 1}: datasets.map {base[-1]:,.0f} tokens/s, pretrain prepare {cand[-1]:,.0f} tokens/s",
            flush=True,
        )
    print(f"prepare/datasets.map tokens/s ratio = {statistics.median(cand) / statistics.median(base):.2f} "
          f"({args.mb} MB, {args.novel:.0%} novel words per copy{', non-ASCII' if args.unicode else ''}, {cores} cores, median of {args.repeats})")  # fmt: skip


if __name__ == "__main__":
    main()
