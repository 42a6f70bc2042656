"""Error constructors shared by the store and the selector parsers (kept apart to avoid a cycle)."""

from __future__ import annotations


def bad_request(message: str) -> Exception:
    from tests.kubeapi.store import ApiError

    return ApiError(400, "BadRequest", message)
