"""Process lifetime: children that do not outlive their parent."""

from __future__ import annotations

import contextlib
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl; a no-op
    elsewhere). A launcher, torchrun or trainer killed with -9 then leaves no orphan behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
