"""The warning that the log will fill its map or disk (engine/headroom.py), with the time passed
in. The server's own warning, from a map that really fills, is checked in test_server_e2e
(test_map_full_stops_the_server_and_a_larger_map_recovers_every_acknowledged_change)."""

from __future__ import annotations

import math

import pytest

from quotad.core.limits import (
    IDEMPOTENCY_RETENTION_NS_MAX, LOG_FULL_WARN_REPEAT_S, LOG_FULL_WARN_WITHIN_S,
    LOG_GROWTH_SMOOTHING_S, LOG_KEPT_NS_MIN,
)
from quotad.engine.headroom import LogHeadroom

GIB = 1024**3
DAY_S = 24 * 3600
DISK_FREE = 10**15


def grow(headroom: LogHeadroom, *, start_s: float, seconds: int, used_bytes: int,
         bytes_per_s: float, map_bytes: int = 64 * GIB, disk_free_bytes: int = DISK_FREE,
         kept_ns: int = LOG_KEPT_NS_MIN):
    """A sample a second for `seconds` while the file grows at bytes_per_s: every warning
    (time, what it said) and the bytes in use at the end."""
    warnings = []
    for second in range(seconds + 1):
        now_s = start_s + second
        used = used_bytes + int(bytes_per_s * second)
        soon = headroom.sample(now_s, used, map_bytes, disk_free_bytes, kept_ns)
        if soon is not None:
            warnings.append((now_s, soon))
    return warnings, used_bytes + int(bytes_per_s * seconds)


def test_a_first_sample_and_a_file_that_does_not_grow_warn_of_nothing_however_full() -> None:
    headroom = LogHeadroom()
    assert headroom.sample(0.0, 63 * GIB, 64 * GIB, DISK_FREE) is None
    warnings, _ = grow(headroom, start_s=1.0, seconds=3600, used_bytes=63 * GIB, bytes_per_s=0)
    assert warnings == []  # past the retention, pruning frees what new records take
    assert headroom.growth_bytes_per_s == 0


def test_steady_growth_that_fills_the_map_within_a_day_warns_with_the_time_left() -> None:
    headroom = LogHeadroom()
    rate = 2_700_000  # 10,000 operations/s at ~270 bytes each
    warnings, used = grow(headroom, start_s=0.0, seconds=4 * int(LOG_GROWTH_SMOOTHING_S),
                          used_bytes=GIB, bytes_per_s=rate)
    assert warnings, "64 GiB at 2.7 MB/s fills in ~7 hours"
    _, last = warnings[-1]
    assert last.bound == "map" and last.left_bytes == 64 * GIB - last.used_bytes
    assert last.fills_in_s == pytest.approx(last.left_bytes / last.growth_bytes_per_s)
    assert 6 * 3600 < last.fills_in_s < 8 * 3600
    assert used > last.used_bytes
    assert headroom.growth_bytes_per_s == pytest.approx(rate, rel=0.03)  # smoothed, converged
    times = [at for at, _ in warnings]
    assert all(later - earlier >= LOG_FULL_WARN_REPEAT_S
               for earlier, later in zip(times, times[1:]))


def test_the_disk_is_the_bound_when_it_has_less_room_than_the_map() -> None:
    headroom = LogHeadroom()
    warnings, _ = grow(headroom, start_s=0.0, seconds=3 * int(LOG_GROWTH_SMOOTHING_S),
                       used_bytes=GIB, bytes_per_s=1_000_000, disk_free_bytes=20 * GIB)
    assert warnings and {soon.bound for _, soon in warnings} == {"disk"}
    assert warnings[-1][1].left_bytes == 20 * GIB


def test_growth_that_lasts_more_than_a_day_warns_of_nothing() -> None:
    headroom = LogHeadroom()
    rate = 63 * GIB / (2 * DAY_S)  # two days to the map
    warnings, _ = grow(headroom, start_s=0.0, seconds=4 * int(LOG_GROWTH_SMOOTHING_S),
                       used_bytes=GIB, bytes_per_s=rate)
    assert warnings == []
    assert headroom.growth_bytes_per_s == pytest.approx(rate, rel=0.03)
    assert LOG_FULL_WARN_WITHIN_S == DAY_S


def test_a_burst_moves_the_rate_by_its_share_of_the_smoothing_time() -> None:
    """A snapshot of 100 MB written at once (one second's growth) counts as 100 MB over
    LOG_GROWTH_SMOOTHING_S, not as 100 MB/s."""
    headroom = LogHeadroom()
    assert headroom.sample(0.0, GIB, 64 * GIB, DISK_FREE) is None
    assert headroom.sample(1.0, GIB + 100_000_000, 64 * GIB, DISK_FREE) is None
    weight = 1 - math.exp(-1 / LOG_GROWTH_SMOOTHING_S)
    assert headroom.growth_bytes_per_s == pytest.approx(100_000_000 * weight)


def test_samples_out_of_order_or_at_the_same_instant_change_nothing() -> None:
    headroom = LogHeadroom()
    headroom.sample(10.0, GIB, 64 * GIB, DISK_FREE)
    assert headroom.sample(10.0, 2 * GIB, 64 * GIB, DISK_FREE) is None
    assert headroom.sample(5.0, 3 * GIB, 64 * GIB, DISK_FREE) is None
    assert headroom.growth_bytes_per_s == 0


@pytest.mark.parametrize("extra_bytes, warned", [(0, True), (1, False)])
def test_a_map_that_fills_in_exactly_a_day_warns_and_a_byte_more_does_not(
        extra_bytes: int, warned: bool) -> None:
    """Two samples LOG_GROWTH_SMOOTHING_S x 100 apart: the rate is then the step's own (the
    older mean weighs exp(-100), nothing in a float), so the time left is exact."""
    headroom = LogHeadroom()
    elapsed_s = 100 * LOG_GROWTH_SMOOTHING_S
    grown = 10**9
    rate = grown / elapsed_s
    used = GIB + grown
    map_bytes = used + int(rate * LOG_FULL_WARN_WITHIN_S) + extra_bytes
    assert rate * LOG_FULL_WARN_WITHIN_S == int(rate * LOG_FULL_WARN_WITHIN_S)
    headroom.sample(0.0, GIB, map_bytes, DISK_FREE)
    soon = headroom.sample(elapsed_s, used, map_bytes, DISK_FREE)
    assert headroom.growth_bytes_per_s == rate
    assert (soon is not None) is warned
    if soon is not None:
        assert soon.fills_in_s == LOG_FULL_WARN_WITHIN_S and soon.bound == "map"


ONE_THOUSAND_OPS_BYTES_PER_S = 270_000
"""1,000 operations/s at ~270 bytes each: a day of records is ~23 GB."""


def test_below_a_size_bound_that_holds_a_day_of_records_the_map_is_out_of_reach() -> None:
    """At 45 GiB of a 64 GiB map, 270 KB/s fills the map in ~21 h; but the log's size bound
    (48 GiB) stops the growth first, since a day of records (~23 GB) fits under it."""
    args = dict(start_s=0.0, seconds=4 * int(LOG_GROWTH_SMOOTHING_S), used_bytes=45 * GIB,
                bytes_per_s=ONE_THOUSAND_OPS_BYTES_PER_S)
    unbounded, _ = grow(LogHeadroom(), **args)
    assert unbounded and unbounded[-1][1].bound == "map"
    bounded, used = grow(LogHeadroom(live_bytes_max=48 * GIB), **args)
    assert bounded == [] and used < 48 * GIB


def test_a_size_bound_a_day_of_records_passes_does_not_keep_the_map_from_filling() -> None:
    rate = 2_700_000  # 10,000 operations/s: a day is ~233 GB, more than the 48 GiB bound
    warnings, _ = grow(LogHeadroom(live_bytes_max=48 * GIB), start_s=0.0,
                       seconds=4 * int(LOG_GROWTH_SMOOTHING_S), used_bytes=GIB,
                       bytes_per_s=rate)
    assert warnings and warnings[-1][1].bound == "map"
    assert 6 * 3600 < warnings[-1][1].fills_in_s < 8 * 3600


def test_records_kept_longer_than_the_bound_holds_do_not_keep_the_map_from_filling() -> None:
    """At 1,000 operations/s a day of records (~23 GB) fits under a 48 GiB bound, so the bound
    stops the growth; with the keys kept 90 days (--idempotency-retention-hours 2160, ~2 TB of
    records) pruning cannot hold it there and the map fills: the warning follows the
    retention each sample is given."""
    args = dict(start_s=0.0, seconds=4 * int(LOG_GROWTH_SMOOTHING_S), used_bytes=45 * GIB,
                bytes_per_s=ONE_THOUSAND_OPS_BYTES_PER_S)
    day, _ = grow(LogHeadroom(live_bytes_max=48 * GIB), kept_ns=LOG_KEPT_NS_MIN, **args)
    assert day == []
    ninety_days, _ = grow(LogHeadroom(live_bytes_max=48 * GIB),
                          kept_ns=IDEMPOTENCY_RETENTION_NS_MAX, **args)
    assert ninety_days and ninety_days[-1][1].bound == "map"


def test_below_a_size_bound_a_disk_with_less_room_than_it_is_warned_of() -> None:
    warnings, _ = grow(LogHeadroom(live_bytes_max=48 * GIB), start_s=0.0,
                       seconds=4 * int(LOG_GROWTH_SMOOTHING_S), used_bytes=10 * GIB,
                       bytes_per_s=ONE_THOUSAND_OPS_BYTES_PER_S, disk_free_bytes=5 * GIB)
    assert warnings, "5 GiB of disk at 270 KB/s is ~5.5 h, before the bound's 38 GiB"
    _, last = warnings[-1]
    assert last.bound == "disk" and last.left_bytes == 5 * GIB
    warnings, _ = grow(LogHeadroom(live_bytes_max=48 * GIB), start_s=0.0,
                       seconds=4 * int(LOG_GROWTH_SMOOTHING_S), used_bytes=10 * GIB,
                       bytes_per_s=ONE_THOUSAND_OPS_BYTES_PER_S, disk_free_bytes=39 * GIB)
    assert warnings == []  # the bound comes first
