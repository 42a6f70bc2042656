"""A pretrained tokenizer's folder checked before anything is loaded or allocated.

`tokenizers` sizes its id tables by the largest id: a tokenizer.json whose ids reach four
billion made `fingerprint()` allocate 8 GiB and abort, and one with three million entries
built a 192M-parameter embedding. Both passed `pretrain validate`. Reading the JSON here costs
what the file costs (bounded), and says in one line, naming the field, what is wrong.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from pretrain.api.spec import ModelSpec
from pretrain.api.validation import SpecError

FIELD = "spec.tokenizer.path"
#: The largest vocabulary a model may have: `model.vocabSize`'s maximum in the API.
MAX_VOCAB: int = ModelSpec.model_fields["vocab_size"].metadata[0].le
#: A tokenizer folder's files together (the largest real tokenizer.json are tens of MB).
MAX_TOKENIZER_BYTES = 256 * 2**20


def _looks_like_a_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else names a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_tokenizer_path(path: str, model_vocab: int | None = None, *, here: bool = True) -> None:
    """Raise SpecError when the local tokenizer at `path` is missing, a link loop, too large,
    or has more tokens or a larger id than the model may have (`model_vocab` when set, else
    the API's maximum). A hub name that is not a local path passes (checked once loaded), and
    so does a missing path when the job runs elsewhere (`here` false: `pretrain validate` of a
    cluster job, whose path is in the pod)."""
    p = Path(path).expanduser()
    try:
        real = p.resolve(strict=True)
    except RuntimeError:  # Python 3.11 reports a loop so
        raise SpecError(FIELD, f"{path}: a symbolic link loop") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpecError(FIELD, f"{path}: a symbolic link loop") from None
        if here and (p.is_symlink() or _looks_like_a_path(path)):
            raise SpecError(FIELD, f"{path}: no such folder ({e.strerror})") from None
        return  # a hub name, for users with network access
    if not real.is_dir():
        raise SpecError(FIELD, f"{path}: not a folder (give the folder holding tokenizer.json)")
    files = [f for f in real.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    if size > MAX_TOKENIZER_BYTES:
        raise SpecError(
            FIELD, f"{path}: {size} bytes of files, more than the {MAX_TOKENIZER_BYTES} a tokenizer may have"
        )
    if (real / "tokenizer.json").is_file():
        count, top = vocabulary_of(real / "tokenizer.json", path)
        check_vocabulary(path, count, top, model_vocab)


def check_vocabulary(path: str, count: int, top: int, model_vocab: int | None) -> None:
    limit = model_vocab or MAX_VOCAB
    what = (
        f"model.vocabSize ({model_vocab})" if model_vocab else f"the largest vocabulary a model may have ({MAX_VOCAB})"
    )
    if count > limit:
        raise SpecError(FIELD, f"{path}: {count} tokens, more than {what}")
    if top >= limit:
        raise SpecError(FIELD, f"{path}: token id {top} does not fit {what}")


def vocabulary_of(file: Path, shown: str) -> tuple[int, int]:
    """(distinct ids, largest id) of a tokenizer.json: its model's vocabulary (a dict for BPE
    and WordPiece, a list for Unigram) and its added tokens."""
    try:
        data: Any = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:
        raise SpecError(FIELD, f"{shown}/tokenizer.json does not parse ({e.__class__.__name__}: {e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids = list(vocab.values())
    elif isinstance(vocab, list):
        ids = list(range(len(vocab)))
    else:
        raise SpecError(FIELD, f"{shown}/tokenizer.json has no model.vocab")
    ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise SpecError(FIELD, f"{shown}/tokenizer.json: token ids must be whole numbers >= 0")
    return len(set(ids)), max(ids, default=0)
