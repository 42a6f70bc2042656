"""Rank 0's live progress bar (tqdm: step/total, loss, tokens/s, ETA) and its periodic log lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("pretrain.trainer")


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A tqdm bar redrawn in place on a terminal; nothing elsewhere (the log lines carry it)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start = total, start
        self.t0 = time.monotonic()
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")  # fmt: skip

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.t0) / done * (self.total - step)

    def update(self, step: int, *, loss: float, tokens_per_second: float, lr: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_second:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def log(self, step: int, *, loss: float, lr: float, grad_norm: float | None, tokens_per_second: float,
            mfu: float | None = None) -> None:  # fmt: skip
        self.clear()
        gn = f" grad_norm {grad_norm:.3f}" if grad_norm is not None else ""
        utilisation = f" mfu {mfu:.1%}" if mfu is not None else ""
        log.info(
            "step %d/%d loss %.4f lr %.3e%s tokens/s %.0f%s eta %s",
            step, self.total, loss, lr, gn, tokens_per_second, utilisation, format_eta(self.eta(step)),
        )  # fmt: skip
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
