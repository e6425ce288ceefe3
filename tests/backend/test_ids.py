"""Tests for backend.ids: KSUID-style ids, capture ids and random names."""

from __future__ import annotations

import re
import time

import pytest

from backend.ids import (
    KSUID_EPOCH,
    base62_decode,
    base62_encode,
    capture_id,
    ksuid_time,
    new_id,
    random_name,
)

KSUID_RE = re.compile(r"^[a-z]+_[0-9A-Za-z]{27}$")


def test_new_id_shape() -> None:
    for prefix in ("ep", "agin", "ts", "cr", "ak", "rd", "acct"):
        value = new_id(prefix)
        assert value.startswith(prefix + "_")
        assert KSUID_RE.match(value), value


def test_new_id_requires_prefix() -> None:
    with pytest.raises(ValueError):
        new_id("")


def test_new_id_encodes_current_time() -> None:
    before = int(time.time())
    value = new_id("ep")
    after = int(time.time())
    assert before <= ksuid_time(value) <= after


def test_new_ids_are_unique_and_sorted_by_creation() -> None:
    ids = [new_id("ep") for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_ids_sort_by_timestamp_across_seconds() -> None:
    # Bodies from different seconds compare in time order whatever their payloads.
    early = base62_encode(((100) << 128) | ((1 << 128) - 1))
    late = base62_encode((101) << 128)
    assert early < late
    assert len(early) == len(late) == 27


def test_max_ksuid_fits_27_chars() -> None:
    biggest = base62_encode((1 << 160) - 1)
    assert len(biggest) == 27
    assert base62_decode(biggest) == (1 << 160) - 1


def test_base62_roundtrip() -> None:
    for value in (0, 1, 61, 62, 12345678901234567890, 1 << 159):
        assert base62_decode(base62_encode(value)) == value
    with pytest.raises(ValueError):
        base62_decode("not-base62!")
    with pytest.raises(ValueError):
        base62_encode(-1)


def test_ksuid_time_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        ksuid_time("ep_short")
    assert KSUID_EPOCH == 1_400_000_000


def test_capture_id_is_16_hex_and_increasing() -> None:
    ids = [capture_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_random_name() -> None:
    names = {random_name() for _ in range(200)}
    assert all(re.fullmatch(r"[0-9a-f]{8}", n) for n in names)
    assert len(names) > 190
