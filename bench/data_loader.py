"""Sequences/s of the training loader vs what the tiny trainer consumes, and the loader's memory
at 1x and 10x corpus size, in one run.

    python bench/data_loader.py

Target: loader >= 20x the trainer's consumption; RSS independent of corpus size.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOADER_SCRIPT = r"""
import json, sys, time, resource
from pathlib import Path
from pretrain.data.loader import DistributedLoader, PackedSplit
split = PackedSplit(Path(sys.argv[1]), "train")
loader = DistributedLoader(split, rank=0, world_size=2, micro_batch=8, accumulation=2, seed=1)
loader.next_step()
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 3:
    for b in loader.next_step():
        n += len(b)
rate = n / (time.perf_counter() - t0)
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
kb = lambda k: int(status[k].split()[0]) * 1024
# RssFile is shard pages the kernel mapped in (clean, reclaimable); RssAnon is the loader's own.
print(json.dumps({"rows": len(split), "rate": rate, "rss": kb("VmRSS"), "anon": kb("RssAnon"), "file": kb("RssFile")}))
"""


def prepare_corpus(tmp: Path, copies: int) -> Path:
    from pretrain.api.spec import DataSourceSpec, DataSpec
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import chars_tokenizer, fingerprint

    text = (ROOT / "src" / "pretrain" / "corpora" / "tinyshakespeare.txt").read_text()
    corpus = tmp / f"corpus-{copies}.txt"
    corpus.write_text(text * copies)
    tok = chars_tokenizer([text])
    spec = DataSpec(sources=[DataSourceSpec(uri=str(corpus))], sequence_length=128, validation_split=0.0)
    return prepare(spec, tok, fingerprint(tok), tmp / "cache")


def loader_stats(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def trainer_rate(tmp: Path) -> float:
    out = tmp / "trainer"
    env = dict(os.environ, TMPDIR=str(tmp), HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    subprocess.run([sys.executable, "-m", "pretrain.cli", "run", str(ROOT / "examples" / "tiny-cpu.yaml"), "--output", str(out),
                    "--set", "training.maxSteps=30", "--set", "training.evalInterval=0", "--set", "checkpoint.intervalSteps=1000"],
                   check=True, capture_output=True, env=env)  # fmt: skip
    rows = [json.loads(x) for x in (out / "work" / "train_log.jsonl").read_text().splitlines() if '"seconds"' in x]
    step = statistics.median(r["seconds"] for r in rows if r["step"] > 5)
    return 32 / step  # globalBatchSize of the tiny example


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    small, large = prepare_corpus(tmp, 1), prepare_corpus(tmp, 10)
    s1, s10 = loader_stats(small), loader_stats(large)
    consume = trainer_rate(tmp)
    s1b, s10b = loader_stats(small), loader_stats(large)  # a second, interleaved measurement
    rate = statistics.median([s1["rate"], s10["rate"], s1b["rate"], s10b["rate"]])
    print(f"loader: {rate:,.0f} sequences/s (rank 0 of 2); tiny trainer consumes {consume:,.0f} sequences/s "
          f"(2 processes) -> ratio {rate / consume:.0f}x")  # fmt: skip
    for name, a, b in (("1x", s1, s1b), ("10x", s10, s10b)):
        rss, anon, mapped = (statistics.median([a[k], b[k]]) / 2**20 for k in ("rss", "anon", "file"))
        print(f"loader memory at {name} ({int(a['rows']):,} rows): RSS {rss:.0f} MiB = anonymous {anon:.0f} MiB "
              f"+ mapped shard and library pages {mapped:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
