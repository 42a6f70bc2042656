"""Every timestamp form the Kubernetes API, its Python client and Python itself emit parses to
the same naive UTC instant; what we write is what the API server writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pretrain.timestamps import from_epoch, micro_time, parse_time, rfc3339

INSTANT = datetime(2026, 1, 2, 3, 4, 5)


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-02T03:04:05Z",  # Time, as the API server writes it
        "2026-01-02T03:04:05.000000Z",  # MicroTime
        "2026-01-02T03:04:05.000000000Z",  # nanoseconds
        "2026-01-02T03:04:05+00:00",  # the kubernetes client's sanitize_for_serialization
        "2026-01-02T05:04:05+02:00",  # another offset
        "2026-01-01T22:04:05-05:00",
        "2026-01-02t03:04:05z",  # RFC 3339 allows lower case
        "2026-01-02T03:04:05",  # isoformat() of a naive UTC datetime
        "2026-01-02 03:04:05+00:00",  # str() of an aware one
        " 2026-01-02T03:04:05Z\n",
    ],
)
def test_every_form_is_the_same_instant(text: str) -> None:
    assert parse_time(text) == INSTANT


def test_fractions_are_kept_to_the_microsecond() -> None:
    assert parse_time("2026-01-02T03:04:05.123456789Z") == INSTANT + timedelta(microseconds=123456)
    assert parse_time("2026-01-02T03:04:05.5Z") == INSTANT + timedelta(milliseconds=500)


@pytest.mark.parametrize("bad", [None, "", "yesterday", "2026-13-01T00:00:00Z", "12:00"])
def test_what_is_not_a_timestamp_is_none(bad: str | None) -> None:
    assert parse_time(bad) is None


def test_datetimes_pass_through_as_naive_utc() -> None:
    aware = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert parse_time(aware) == INSTANT and parse_time(INSTANT) == INSTANT


def test_written_forms_round_trip() -> None:
    assert rfc3339(INSTANT) == "2026-01-02T03:04:05Z"
    assert rfc3339(INSTANT.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=-3)))) == "2026-01-02T03:04:05Z"
    assert micro_time(INSTANT + timedelta(microseconds=7)) == "2026-01-02T03:04:05.000007Z"
    assert parse_time(micro_time(INSTANT)) == INSTANT
    assert from_epoch(INSTANT.replace(tzinfo=UTC).timestamp()) == "2026-01-02T03:04:05Z"
    assert from_epoch(None) is None
