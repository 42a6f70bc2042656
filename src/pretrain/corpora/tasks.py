"""Labelled tasks built from the bundled Tiny Shakespeare, for fine-tuning examples.

`builtin://plays-train.jsonl` and `builtin://plays-val.jsonl`: speeches of *Romeo and Juliet*
and *The Taming of the Shrew*, told apart by their speakers (the speaker line itself removed),
labelled `romeo-and-juliet` or `taming-of-the-shrew`; a fixed 80/20 split by a hash of the text.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

PLAYS = {
    "romeo-and-juliet": {"ROMEO", "JULIET", "MERCUTIO", "Nurse", "CAPULET", "BENVOLIO", "FRIAR LAURENCE",
                         "TYBALT", "LADY CAPULET", "MONTAGUE"},
    "taming-of-the-shrew": {"PETRUCHIO", "KATHARINA", "BAPTISTA", "GRUMIO", "TRANIO", "BIANCA", "LUCENTIO",
                            "HORTENSIO", "GREMIO", "BIONDELLO"},
}  # fmt: skip


def speeches() -> list[tuple[str, str]]:
    """(speaker, text) of every speech of the corpus."""
    text = (resources.files("pretrain") / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    out = []
    for block in text.split("\n\n"):
        head, _, body = block.strip().partition("\n")
        if head.endswith(":") and body.strip():
            out.append((head[:-1], " ".join(body.split())))
    return out


def plays_rows() -> dict[str, list[dict[str, str]]]:
    speaker_play = {s: play for play, speakers in PLAYS.items() for s in speakers}
    split: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    for speaker, body in speeches():
        play = speaker_play.get(speaker)
        if play is None:
            continue
        held = int(hashlib.sha256(body.encode()).hexdigest()[:8], 16) % 5 == 0
        split["val" if held else "train"].append({"text": body[:400], "label": play})
    return split


GENERATED = {"plays-train.jsonl": ("train", plays_rows), "plays-val.jsonl": ("val", plays_rows)}


def generated_path(name: str) -> Path | None:
    """The file of a generated builtin dataset (made once, in the user's cache), or None."""
    if name not in GENERATED:
        return None
    part, build = GENERATED[name]
    cache = Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain")) / "builtin"
    path = cache / name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("\n".join(json.dumps(r) for r in build()[part]) + "\n")
        tmp.rename(path)
    return path
