"""The loop of the stand-in controllers (the kubelet, the Job controller)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("tests.loops")


def sync_until(stop: threading.Event, sync: Callable[[], None], errors: list[str], what: str,
               period: float = 0.3) -> None:  # fmt: skip
    """Call `sync` every `period` seconds until `stop`; a failure is kept in `errors` and logged,
    and the loop goes on, as a controller's does."""
    while not stop.is_set():
        try:
            sync()
        except Exception as e:
            if not stop.is_set():
                errors.append(repr(e))
                log.warning("%s sync failed: %r", what, e)
        stop.wait(period)
