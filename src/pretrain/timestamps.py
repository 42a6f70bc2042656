"""Timestamps as Kubernetes and the trainer write them, and one parser for every form they take.

Written: RFC 3339 in UTC with `Z`, whole seconds for `Time` fields (`rfc3339`) and microseconds
for `MicroTime` (`micro_time`, Leases). Read (`parse_time`): what the API server writes (`Z`,
fractions up to nanoseconds), what the `kubernetes` client's `sanitize_for_serialization` writes
back (`+00:00`), any offset, RFC 3339's lower-case `t` and `z`, and Python's `isoformat()` with
or without a zone (naive means UTC). Torch-free: the operator and the trainer both use it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

#: Fractions of a second past microseconds (the API server can write nanoseconds).
_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def rfc3339(t: datetime) -> str:
    """A `Time`: whole seconds, UTC, `Z`. A naive datetime is taken as UTC."""
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(t: datetime) -> str:
    """A `MicroTime`, as the API server writes it."""
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_epoch(epoch: float | None) -> str | None:
    """A `Time` from seconds since the epoch (None and 0 stay unset)."""
    return rfc3339(datetime.fromtimestamp(epoch, UTC)) if epoch else None


def parse_time(s: str | datetime | None) -> datetime | None:
    """A timestamp as a naive UTC datetime, or None when unset or not a timestamp (a status
    written by hand must not stop the operator)."""
    if not s:
        return None
    if isinstance(s, datetime):
        t = s
    else:
        text = _LONG_FRACTION.sub(r"\1", s.strip().upper())
        try:
            t = datetime.fromisoformat(text)
        except ValueError:
            return None
    return _utc(t).replace(tzinfo=None)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
