"""Rank 0's live progress line (step/total, loss, tokens/s, ETA) and its periodic log lines."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pretrain.trainer")


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line bar redrawn in place on a terminal; silent elsewhere (log lines carry it)."""

    WIDTH = 24

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start = total, start
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._drawn = False

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.t0) / done * (self.total - step)

    def update(self, step: int, *, loss: float, tokens_per_second: float, lr: float) -> None:
        if not self.tty:
            return
        filled = int(self.WIDTH * step / max(self.total, 1))
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(
            f"\r[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"{tokens_per_second:,.0f} tok/s ETA {format_eta(self.eta(step))}  "
        )
        sys.stderr.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
            self._drawn = False

    def log(self, step: int, *, loss: float, lr: float, grad_norm: float | None, tokens_per_second: float) -> None:
        self.clear()
        gn = f" grad_norm {grad_norm:.3f}" if grad_norm is not None else ""
        log.info(
            "step %d/%d loss %.4f lr %.3e%s tokens/s %.0f eta %s",
            step, self.total, loss, lr, gn, tokens_per_second, format_eta(self.eta(step)),
        )  # fmt: skip

    def close(self) -> None:
        self.clear()
