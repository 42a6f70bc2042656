"""Reading documents from a source: local paths and globs, fsspec URIs, Hugging Face datasets,
and corpora bundled with the package (`builtin://name`).

A document is a string. Plain-text files are one document each (read in line-aligned chunks so
that a multi-GB file never sits in memory whole); JSONL and Parquet give one document per row.
Every problem raises `DataError` with one line naming the source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pretrain.api.spec import DataSourceSpec
from pretrain.errors import UserError
from pretrain.storage.paths import system_path

#: Plain text is handed to the tokenizer in pieces of about this many characters.
TEXT_CHUNK_CHARS = 1 << 20
#: Longest JSONL record read: beyond this a "line" is not a record, and reading on would be unbounded.
MAX_RECORD_CHARS = 64 << 20


class DataError(UserError, ValueError):
    """A source that cannot be read as asked; the message names it."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it is and what identifies its content."""

    uri: str
    size: int
    version: str  # mtime, ETag or similar: changes when the content does


def _builtin_path(name: str) -> Path:
    from pretrain.corpora.tasks import GENERATED, generated_path

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise DataError(f"builtin://{name[:80]}: not a bundled corpus name")
    made = generated_path(name)
    if made is not None:
        return made
    corpora = resources.files("pretrain") / "corpora"
    path = Path(str(corpora / f"{name}.txt"))
    if not path.is_file():
        known = sorted(p.name.removesuffix(".txt") for p in Path(str(corpora)).glob("*.txt"))
        raise DataError(f"builtin://{name}: no such bundled corpus (bundled: {', '.join([*known, *GENERATED])})")
    return path


def resolve_files(src: DataSourceSpec) -> list[SourceFile]:
    """Expand a source into its files, sorted; raise DataError if it names none."""
    uri = src.uri
    if uri.startswith("builtin://"):
        p = _builtin_path(uri.removeprefix("builtin://").strip("/"))
        st = p.stat()
        return [SourceFile(str(p), st.st_size, f"{st.st_size}-{int(st.st_mtime)}")]
    if uri.startswith("hf://") and not _looks_like_files(uri):
        return [SourceFile(uri, 0, "hf")]
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(uri)
    except (ImportError, ValueError) as e:
        raise DataError(f"{uri}: cannot open ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot read ({e.__class__.__name__}: {e})") from None
    files = []
    try:
        for path in sorted(paths):
            info = fs.info(path)
            if info.get("type") == "directory":
                for child in sorted(fs.find(path)):
                    files.append(_file(fs, child, fs.info(child)))
            else:
                files.append(_file(fs, path, info))
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file or directory") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot read ({e.__class__.__name__}: {e})") from None
    if not files:
        raise DataError(f"{uri}: matches no files")
    return files


def _looks_like_files(uri: str) -> bool:
    return any(ch in uri for ch in "*?[") or uri.rsplit("/", 1)[-1].count(".") > 0


def _file(fs: Any, path: str, info: dict[str, Any]) -> SourceFile:
    version = str(info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("created") or "")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    if local:
        check_local_file(path)
    uri = path if local else f"{protocol}://{path}"
    return SourceFile(uri, int(info.get("size") or 0), version)


def check_local_file(path: str) -> None:
    """A local data file must be a regular file outside the system folders (symlinks followed)."""
    real = os.path.realpath(path)
    where = system_path(real)
    if where is not None:
        raise DataError(f"{path}: lies in {where}, the machine's own files; a data source reads a corpus")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return  # missing: the reader says so
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a device, pipe or socket is not a corpus)")


def source_fingerprint(src: DataSourceSpec, files: list[SourceFile]) -> str:
    h = hashlib.sha256(json.dumps([src.model_dump(), [(f.uri, f.size, f.version) for f in files]]).encode())
    return h.hexdigest()[:16]


def data_format(src: DataSourceSpec, uri: str) -> str:
    if src.format != "auto":
        return src.format
    name = uri.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    return "text"


@contextlib.contextmanager
def reading(uri: str) -> Iterator[None]:
    """Turn the errors of reading `uri` into one-line DataErrors naming it."""
    try:
        yield
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not UTF-8 text (set the source's format?)") from None
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot read ({e.__class__.__name__}: {e})") from None


def iter_documents(src: DataSourceSpec, file: SourceFile) -> Iterator[str]:
    """Documents of one file (text in line-aligned chunks, else the text field of each row)."""
    if (file.uri.startswith("hf://") and file.version == "hf") or data_format(src, file.uri) != "text":
        for where, row in iter_rows(src, file):
            value = _field(row, src.text_field, where)
            if value:
                yield value
        return
    import fsspec

    with reading(file.uri), fsspec.open(file.uri, "rt", encoding="utf-8", compression="infer") as f:
        while True:
            chunk = f.read(TEXT_CHUNK_CHARS)
            if not chunk:
                break
            tail = f.readline(TEXT_CHUNK_CHARS)  # end on a line boundary, or after one more chunk
            yield chunk + tail


def iter_rows(src: DataSourceSpec, file: SourceFile) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every record of a JSONL, CSV or Parquet file or a Hugging Face dataset;
    `where` names the file and row for error messages."""
    if file.uri.startswith("hf://") and file.version == "hf":
        yield from _iter_hf(src)
        return
    fmt = data_format(src, file.uri)
    import fsspec

    with reading(file.uri):
        if fmt == "parquet":
            yield from _iter_parquet(file.uri)
            return
        with fsspec.open(file.uri, "rt", encoding="utf-8", compression="infer", newline="") as f:
            if fmt == "csv":
                import csv

                try:
                    for lineno, row in enumerate(csv.DictReader(f), 2):
                        yield f"{file.uri}:{lineno}", dict(row)
                except csv.Error as e:
                    raise DataError(f"{file.uri}: not readable as CSV ({e})") from None
                return
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_RECORD_CHARS + 1), ""), 1):
                record = jsonl_record(line, f"{file.uri}:{lineno}")
                if record is not None:
                    yield f"{file.uri}:{lineno}", record


def jsonl_record(line: str, where: str) -> dict[str, Any] | None:
    """One JSONL line as a JSON object (None for a blank line), or a DataError naming `where`."""
    if len(line) > MAX_RECORD_CHARS:
        raise DataError(f"{where}: a record longer than {MAX_RECORD_CHARS} characters (is this JSONL?)")
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def row_text(src: DataSourceSpec, line: str, where: str) -> str:
    """The text field of one JSONL line ("" for a blank line)."""
    row = jsonl_record(line, where)
    return "" if row is None else _field(row, src.text_field, where)


def _field(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no text field {field!r} (fields: {keys})")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _iter_parquet(uri: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"{uri}: not a Parquet file ({str(e).splitlines()[0]})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"{uri} row {n}", row


def _iter_hf(src: DataSourceSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """A Hugging Face dataset by name or local directory: hf://owner/name[/split]."""
    import datasets

    name = src.uri.removeprefix("hf://")
    split = "train"
    parts = name.split("/")
    if len(parts) == 3:
        name, split = "/".join(parts[:2]), parts[2]
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # the hub client raises many kinds; all mean "cannot read"
        raise DataError(f"{src.uri}: cannot load dataset ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    for i, row in enumerate(ds):
        yield f"{src.uri} row {i}", dict(row)
