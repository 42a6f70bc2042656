"""What `pretrain run` shows of torchrun's output.

When a worker fails, torchrun prints its own report: the worker's traceback, error-level lines of
torch.distributed.elastic, a second traceback of torchrun itself and a banner of `=====` lines
(ChildFailedError): 100 to 300 lines for a one-line problem such as an empty corpus. The
launcher passes everything else through as it comes (log lines, the progress bar) and keeps those
blocks in `<run folder>/work/launcher.log`; `--verbose` shows them too. The trainer's own one-line
reason is printed last by the launcher, so nothing needed is lost.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import BinaryIO

#: torch.distributed.elastic's glog-style error lines: E1129 06:00:00.123000 1234 torch/...
ELASTIC_ERROR = re.compile(rb"^E\d{4} \d\d:\d\d:\d\d")
TRACEBACK = b"Traceback (most recent call last):"
BANNER = re.compile(rb"^={20,}\s*$")


class ReportFilter:
    """Feed it torchrun's output in chunks; it writes what a person should see to `show` and the
    rest (tracebacks, elastic error lines, the failure banner) to `keep`, unless `verbose`."""

    def __init__(self, show: Callable[[bytes], None], keep: Callable[[bytes], None], verbose: bool = False) -> None:
        self.show, self.keep, self.verbose = show, keep, verbose
        self.pending = b""  # a line not yet complete
        self.in_traceback = False
        self.in_banner = False
        self.hidden = 0

    def feed(self, data: bytes) -> None:
        self.keep(data)  # the log file holds everything, in order
        data = self.pending + data
        *lines, self.pending = data.split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        # A partial line that cannot start a hidden block (a progress bar redrawn with \r) is
        # shown at once, so that it stays live.
        if self.pending and not self._may_hide(self.pending):
            self.show(self.pending)
            self.pending = b""

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = b""

    def _may_hide(self, partial: bytes) -> bool:
        head = partial.lstrip(b"\r")
        return (
            self.in_traceback
            or self.in_banner
            or TRACEBACK.startswith(head[: len(TRACEBACK)])
            or head[:1] in (b"E", b"=", b" ")
        )

    def _line(self, line: bytes) -> None:
        hide = self._classify(line.rstrip(b"\n").lstrip(b"\r"))
        if hide and not self.verbose:
            self.hidden += 1
        else:
            self.show(line)

    def _classify(self, text: bytes) -> bool:
        if self.in_banner:
            if BANNER.match(text):
                self.in_banner = False
            return True
        if self.in_traceback:
            if text.startswith((b" ", b"\t")) or not text.strip() or text.startswith(b"During handling"):
                return True
            if text.startswith(TRACEBACK):
                return True
            self.in_traceback = False  # the exception line closes the block, and is part of it
            return True
        if text.startswith(TRACEBACK):
            self.in_traceback = True
            return True
        if BANNER.match(text):
            self.in_banner = True
            return True
        return bool(ELASTIC_ERROR.match(text))


def pump(source: BinaryIO, out: BinaryIO, keep: Callable[[bytes], None], verbose: bool) -> ReportFilter:
    """Copy one of torchrun's streams through a ReportFilter until it ends."""
    import os

    def show(b: bytes) -> None:
        out.write(b)
        out.flush()

    f = ReportFilter(show, keep, verbose)
    fd = source.fileno()
    while chunk := os.read(fd, 65536):
        f.feed(chunk)
    f.close()
    return f
