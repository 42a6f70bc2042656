"""A fuzzer of job files for `pretrain validate` (run by tests/test_fuzz_specs.py in a process of
its own, with 1 GiB of address space and 10 s per case).

Each case is the tiny example mutated: a field deleted or given a hostile value (infinities, huge
numbers and strings, deep nesting, wrong types, paths into /proc, URLs with passwords), or the
text itself damaged (truncated, bytes flipped, an alias bomb, invalid UTF-8, deep flow nesting).
For every case the command must answer 0 (valid) or 1 with exactly one `error:` line, and never
a traceback. Prints one JSON line per failing case, then a summary line.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())

HOSTILE: list[Any] = [
    None, "", -1, 0, 1, 1e308, -1e308, float("inf"), float("nan"), 10**30, "x" * 100_000, [], {}, [1, 2],
    {"a": {"b": {"c": 1}}}, True, "é\u202e\x00", "../../../../etc/passwd", "/proc/self/environ", "/dev/zero",
    "s3://user:pass@bucket/x", "builtin://../../x", 1.5, "1e9", "Infinity", {"$ref": "#"}, ["a"] * 1000,
]  # fmt: skip


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def deep(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"d": node}
    return node


def mutate_doc(rng: random.Random) -> str:
    doc = copy.deepcopy(BASE)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(paths(doc))
        parent: Any = doc
        for k in where[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and rng.random() < 0.25:
            parent.pop(where[-1], None)
        else:
            parent[where[-1]] = rng.choice([*HOSTILE, deep(rng.randint(50, 300))])
    return json.dumps(doc)  # JSON is YAML, and its writer takes the deep values


def mutate_text(rng: random.Random) -> bytes:
    text = yaml.safe_dump(BASE).encode()
    kind = rng.randrange(7)
    if kind == 0:
        return text[: rng.randrange(len(text))]
    if kind == 1:
        data = bytearray(text)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # the billion laughs
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]"
                  for i in range(9)]  # fmt: skip
        return ("\n".join(lines) + "\n").encode() + text
    if kind == 3:
        return b"[" * rng.randint(1000, 100_000)
    if kind == 4:
        return text + b"\n" + b"# padding\n" * 120_000  # past the 1 MiB limit
    if kind == 5:
        return b"\xff\xfe" + text
    return text.replace(b"  ", b"\t", rng.randint(1, 5))


class Timeout(Exception):
    pass


def main() -> int:
    cases, seed = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from click.testing import CliRunner

    from pretrain.cli import main as cli

    def on_alarm(*_: Any) -> None:
        raise Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    bad = 0
    slowest = 0.0
    for i in range(cases):
        data = mutate_doc(rng).encode() if i % 3 else mutate_text(rng)
        f = work / f"case-{i}.yaml"
        f.write_bytes(data)
        t0 = time.monotonic()
        signal.alarm(10)
        problem = None
        try:
            r = CliRunner().invoke(cli, ["validate", str(f)])
            lines = r.stderr.strip().splitlines()
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                problem = f"raised {type(r.exception).__name__}: {str(r.exception)[:200]}"
            elif r.exit_code not in (0, 1):
                problem = f"exit code {r.exit_code}"
            elif r.exit_code == 1 and (len(lines) != 1 or not lines[0].startswith("error: ")):
                problem = f"not one error line: {r.stderr[:300]!r}"
            elif "Traceback" in r.output:
                problem = "a traceback"
        except Timeout:
            problem = "over 10 s"
        except MemoryError:
            problem = "over 1 GiB"
        finally:
            signal.alarm(0)
        slowest = max(slowest, time.monotonic() - t0)
        if problem:
            bad += 1
            print(json.dumps({"case": i, "problem": problem, "file": str(f)}), flush=True)
    print(json.dumps({"cases": cases, "bad": bad, "slowest_s": round(slowest, 2)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
