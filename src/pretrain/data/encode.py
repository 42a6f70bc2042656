"""Token ids of many documents, fast: what `pretrain data prepare` spends its time on.

The Rust tokenizer builds a full `Encoding` for every document (token strings, offsets, masks)
and runs BPE on every pre-token again, although natural text repeats its words endlessly. For
the pipelines whose output is a pure function of each pre-token, `PieceEncoder` does less:

- byte-level BPE (GPT-2 style: the `ByteLevel` pre-tokenizer with its regex, no normaliser),
  which `pretrain tokenizer train` and most pretrained GPT-style tokenizers use;
- the built-in `chars` tokenizer (`Split` on whitespace runs, BPE without merges);
- the built-in `bytes` tokenizer (byte-level, no regex, no merges: a 256-entry table).

It splits each document with the same regex, asks the tokenizer's own BPE model once per
distinct piece, and assembles the ids of a whole batch with numpy. Any other tokenizer, and any
document that contains an added token's text (which the tokenizer would extract first), goes
through the tokenizer itself. Either way the ids equal `tokenizer.encode(doc).ids`; the tests
check that on the corpus and on random Unicode text.

`BatchEncoder` runs the encoder in spawned worker processes, one per usable core, once the input
is large enough to repay their start-up (a worker imports numpy, regex and tokenizers, not torch).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("pretrain.data")

#: The pre-tokenisation regex of `tokenizers`' ByteLevel (and of GPT-2).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: The same on ASCII text, for Python's faster `re` (with re.ASCII, \s is exactly the ASCII White_Space).
BYTE_LEVEL_ASCII_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
#: Split patterns known to mean the same in Oniguruma (tokenizers) and Python's `regex` (and,
#: on ASCII text, in `re`).
SPLIT_PATTERNS = {r"\s+|\S+"}
#: Distinct pieces remembered per encoder before the memory is cleared (bounds its size).
MAX_PIECES = 500_000
#: Characters encoded in-process before worker processes are started.
PARALLEL_AFTER_CHARS = 8 * 2**20


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, as `tokenizers`' ByteLevel uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@dataclass(frozen=True)
class EncoderConfig:
    """Everything a worker process needs (picklable): the backend tokenizer's JSON definition."""

    tokenizer_json: str
    eos: int
    dtype: str


@dataclass(frozen=True)
class PieceRule:
    """How a tokenizer cuts text into independently tokenised pieces."""

    pattern: str | None  # None: the whole document is one piece
    ascii_pattern: str | None  # what `pattern` means on ASCII text, in `re` syntax
    byte_level: bool
    add_prefix_space: bool
    merges: bool


def piece_rule(definition: dict[str, Any]) -> PieceRule | None:
    """The piece rule of a tokenizer definition (tokenizer.json), or None when its output is not a
    pure function of the pieces we can cut (normalisers, other pre-tokenizers, dropout, ...)."""
    model = definition.get("model") or {}
    if definition.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return None
    merges = bool(model.get("merges"))
    pre = definition.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return PieceRule(
                BYTE_LEVEL_PATTERN, BYTE_LEVEL_ASCII_PATTERN, True, bool(pre.get("add_prefix_space")), merges
            )
        if not merges and not pre.get("add_prefix_space"):
            return PieceRule(None, None, True, False, False)
        return None
    pattern = (pre.get("pattern") or {}).get("Regex")
    split = pre.get("type") == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert")
    if split and pattern in SPLIT_PATTERNS:
        return PieceRule(pattern, pattern, False, False, merges)
    return None


class _Growable:
    """A numpy array that appends in amortised constant time (its capacity doubles), so learning
    new pieces never copies everything learned before."""

    def __init__(self, dtype: np.dtype[Any], initial: Iterable[int]) -> None:
        self._data = np.empty(1024, dtype=dtype)
        self._size = 0
        self.extend(list(initial))

    def extend(self, values: Any) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        end = self._size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = values
        self._size = end

    def view(self) -> np.ndarray[Any, Any]:
        return self._data[: self._size]


class _PieceIndex(dict[str, int]):
    """Piece -> entry number. A miss numbers the piece and queues it (hits stay in C); the encoder
    learns the whole queue in one tokenizer call before it assembles ids."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.next = first
        self.queue: list[str] = []

    def __missing__(self, piece: str) -> int:
        index = self[piece] = self.next
        self.next += 1
        self.queue.append(piece)
        return index


def _pieces_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer's BPE model behind a newline split and nothing else (no added tokens, no
    post-processing): tokenises many byte-level pieces, joined by newlines, in one call."""
    from tokenizers import Tokenizer

    definition = json.loads(tokenizer.to_str())
    definition.update(
        added_tokens=[], normalizer=None, post_processor=None, decoder=None, truncation=None, padding=None,
        pre_tokenizer={"type": "Split", "pattern": {"String": "\n"}, "behavior": "Removed", "invert": False},
    )  # fmt: skip
    return Tokenizer.from_str(json.dumps(definition))


class PieceEncoder:
    """Ids of documents from a cache of distinct pieces (see the module docstring)."""

    def __init__(self, tokenizer: Any, rule: PieceRule, eos: int, dtype: np.dtype[Any]) -> None:
        import regex

        self._tokenizer, self._rule, self._eos, self._dtype = tokenizer, rule, eos, dtype
        self._model = tokenizer.model
        self._split: Callable[[str], list[str]] | None = regex.compile(rule.pattern).findall if rule.pattern else None
        self._split_ascii = re.compile(rule.ascii_pattern or "", re.ASCII).findall  # about twice as fast
        self._added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content]
        table = bytes_to_unicode()
        self._to_byte_chars = {b: table[b] for b in range(256)}
        self._many = _pieces_tokenizer(tokenizer) if rule.byte_level and rule.pattern else None
        if rule.pattern is None:
            self._byte_ids = np.array([self._piece_ids(table[b])[0] for b in range(256)], dtype=dtype)
        self._reset()

    def _reset(self) -> None:
        self._index = _PieceIndex(first=1)
        self._ids = _Growable(self._dtype, [self._eos])  # ids of every entry, back to back; entry 0 is EOS
        self._starts = _Growable(np.dtype(np.int64), [0, 1])  # entry i is ids[starts[i]:starts[i + 1]]

    def _piece_ids(self, piece: str) -> list[int]:
        return [t.id for t in self._model.tokenize(piece)]

    def _learn_queued(self) -> None:
        """Tokenise the pieces first seen since the last call, in the order they were numbered."""
        queue = self._index.queue
        if not queue:
            return
        texts = (
            [p.encode("utf-8").decode("latin-1").translate(self._to_byte_chars) for p in queue]
            if self._rule.byte_level
            else queue
        )
        lengths = None
        if self._many is not None:  # all pieces in one call: ByteLevel text never holds a raw newline
            enc = self._many.encode("\n".join(texts), add_special_tokens=False)
            lengths = np.bincount(np.array(enc.word_ids, dtype=np.int64), minlength=len(texts))
            ids = enc.ids
            if len(lengths) != len(texts) or not lengths.all():  # not one word per piece after all
                lengths = None
        if lengths is None:  # one by one
            per_piece = [self._piece_ids(text) for text in texts]
            lengths = np.array([len(x) for x in per_piece], dtype=np.int64)
            ids = list(itertools.chain.from_iterable(per_piece))
        self._ids.extend(ids)
        self._starts.extend(self._starts.view()[-1] + np.cumsum(lengths))
        queue.clear()

    def _reference(self, doc: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(doc, add_special_tokens=False).ids
        return ids

    def __call__(self, docs: list[str]) -> np.ndarray[Any, Any]:
        """The ids of `docs`, each followed by EOS, as one flat array."""
        if len(self._index) > MAX_PIECES:
            self._reset()
        parts: list[np.ndarray[Any, Any]] = []
        pieces: list[int] = []
        lookup, split, split_ascii, added = self._index.__getitem__, self._split, self._split_ascii, self._added
        for doc in docs:
            if added and any(a in doc for a in added):
                parts.append(self._assemble(pieces))
                pieces = []
                parts.append(np.array([*self._reference(doc), self._eos], dtype=self._dtype))
                continue
            if split is None:  # bytes: a table lookup per byte
                parts.append(self._assemble(pieces))
                pieces = []
                parts.append(self._byte_ids[np.frombuffer(doc.encode("utf-8") + b"\0", np.uint8)])
                parts[-1][-1] = self._eos
                continue
            if self._rule.add_prefix_space and doc and not doc.startswith(" "):
                doc = " " + doc
            pieces.extend(map(lookup, (split_ascii if doc.isascii() else split)(doc)))
            pieces.append(0)  # EOS
        parts.append(self._assemble(pieces))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _assemble(self, pieces: list[int]) -> np.ndarray[Any, Any]:
        if not pieces:
            return np.zeros(0, dtype=self._dtype)
        self._learn_queued()
        starts = self._starts.view()
        which = np.array(pieces, dtype=np.int64)
        first = starts[which]
        lens = starts[which + 1] - first
        ends = np.cumsum(lens)
        positions = np.arange(int(ends[-1])) + np.repeat(first - (ends - lens), lens)
        out: np.ndarray[Any, Any] = self._ids.view()[positions]
        return out


class TokenizerEncoder:
    """Ids through the tokenizer itself: any tokenizer, Rust batch encoder when there is one."""

    def __init__(self, tokenizer: Any, eos: int, dtype: np.dtype[Any]) -> None:
        self._tokenizer, self._eos, self._dtype = tokenizer, eos, dtype

    def __call__(self, docs: list[str]) -> np.ndarray[Any, Any]:
        tok = self._tokenizer
        if hasattr(tok, "encode_batch_fast"):  # a `tokenizers.Tokenizer`
            encoded = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
        else:  # a transformers tokenizer without a Rust backend
            encoded = tok(docs, add_special_tokens=False)["input_ids"]
        count = sum(len(ids) for ids in encoded) + len(encoded)
        flat = itertools.chain.from_iterable(itertools.chain(ids, (self._eos,)) for ids in encoded)
        return np.fromiter(flat, dtype=self._dtype, count=count)


def encoder_from_config(config: EncoderConfig) -> Callable[[list[str]], np.ndarray[Any, Any]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(config.tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    rule = piece_rule(json.loads(config.tokenizer_json))
    dtype = np.dtype(config.dtype)
    if rule is not None:
        return PieceEncoder(tok, rule, config.eos, dtype)
    return TokenizerEncoder(tok, config.eos, dtype)


_worker_encoder: Callable[[list[str]], np.ndarray[Any, Any]] | None = None


def _init_worker(config: EncoderConfig) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_encoder = encoder_from_config(config)


def _encode_in_worker(docs: list[str]) -> np.ndarray[Any, Any]:
    assert _worker_encoder is not None
    return _worker_encoder(docs)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 `cpu.max`, or v1 CFS quota), None if unlimited:
    a pod limited to 8 CPUs on a 128-core node must not start 128 workers."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by the container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


class BatchEncoder:
    """Encodes batches of documents in order, in worker processes once the input is large.

    Use as a context manager (it owns the workers): `for ids in enc.map(batches): ...`.
    """

    def __init__(self, tokenizer: Any, dtype: np.dtype[Any], *, workers: int | None = None) -> None:
        eos = int(tokenizer.eos_token_id)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._config = EncoderConfig(backend.to_str(), eos, dtype.name) if backend is not None else None
        self._local = encoder_from_config(self._config) if self._config else TokenizerEncoder(tokenizer, eos, dtype)
        self._workers = usable_cores() if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[list[str]]) -> Iterator[np.ndarray[Any, Any]]:
        """Flat ids (EOS after every document) of each batch, in the order given."""
        seen = 0
        it = iter(batches)
        for batch in it:
            yield self._local(batch)
            seen += sum(map(len, batch))
            if seen >= PARALLEL_AFTER_CHARS and self._workers > 1 and self._config is not None:
                break
        else:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a process that may hold torch threads
                initializer=_init_worker,
                initargs=(self._config,),
            )
        pending: collections.deque[tuple[list[str], Future[np.ndarray[Any, Any]]]] = collections.deque()
        unsent: list[str] | None = None  # taken from `it`, not yet in `pending`
        try:
            for batch in it:
                unsent = batch
                pending.append((batch, self._pool.submit(_encode_in_worker, batch)))
                unsent = None
                if len(pending) >= 2 * self._workers:  # bounded: the corpus never sits in memory
                    ids = pending[0][1].result()
                    pending.popleft()  # only once its ids are in hand
                    yield ids
            while pending:
                ids = pending[0][1].result()
                pending.popleft()
                yield ids
        except BrokenProcessPool:  # a worker died (the OOM killer, most likely): finish here, slower
            log.warning("a tokenizer worker process died; encoding the rest in this process")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            for batch, _ in pending:
                yield self._local(batch)
            if unsent is not None:
                yield self._local(unsent)
            for batch in it:
                yield self._local(batch)
