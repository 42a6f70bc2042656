"""Tokenizers: built-in byte and character vocabularies, trained byte-level BPE, or a pretrained one.

Every tokenizer built here is a plain Hugging Face `PreTrainedTokenizerFast` saved with
`save_pretrained`, so an exported model loads with `AutoTokenizer` and no project code. The
byte and character tokenizers are BPE models without merges (one token per byte or character),
which `tokenizers` serialises natively.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pretrain.api.spec import TokenizerSpec

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
UNK = "<|unk|>"
SPECIALS = [EOS, PAD, MASK, UNK]


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, mask_token=MASK, unk_token=UNK
    )
    fast.model_max_length = 1_000_000_000
    return fast


def bytes_tokenizer() -> Any:
    """256 byte tokens plus the special tokens: any text, no training, vocabulary 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return _wrap(tok)


def chars_tokenizer(texts: Iterable[str]) -> Any:
    """One token per distinct character of the sample (unknown characters map to UNK)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    # Whitespace and non-whitespace runs become "words"; BPE without merges splits them into chars.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\S+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_pretrained(path: str) -> Any:
    """A tokenizer directory (local), or a hub name for users with network access."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": tok.sep_token or EOS})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(spec: TokenizerSpec, sample: Iterable[str], model_vocab: int | None = None) -> Any:
    """The tokenizer a job asks for; `sample` is read only by chars and bpe. A pretrained one is
    bounded by `model_vocab` (model.vocabSize, else the API's maximum): its files before they
    are loaded, a hub tokenizer once it is."""
    if spec.type == "bytes":
        return bytes_tokenizer()
    if spec.type == "chars":
        return chars_tokenizer(sample)
    if spec.type == "bpe":
        return train_bpe(sample, spec.vocab_size)
    assert spec.path is not None
    from pretrain.data.tokenizer_bounds import check_tokenizer_path, check_vocabulary

    check_tokenizer_path(spec.path, model_vocab)
    tok = load_pretrained(spec.path)
    check_vocabulary(spec.path, len(tok), id_bound(tok) - 1, model_vocab)
    return tok


def id_bound(tokenizer: Any) -> int:
    """One past the largest token id the tokenizer can produce (its length, unless ids skip)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def fingerprint(tokenizer: Any) -> str:
    """A stable hash of the tokenizer's full definition (vocabulary, merges, normalisation)."""
    data = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def save(tokenizer: Any, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "pretrain_tokenizer.json").write_text(json.dumps({"fingerprint": fingerprint(tokenizer)}))
