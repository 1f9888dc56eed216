"""quotad.windows.window_bounds: calendar windows aligned in local time, correct across DST.

Expected values are written out by hand (as UTC instants) from the published rules of each
zone; the properties check every window against an independent description: it holds now,
the next window starts exactly where it ends, and it begins at the first instant of its local
date (day, Monday, 1st) or where the local clock shows :00 (hour, minute).
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from quotad.core.limits import NS_PER_S as S
from quotad.core.plans import Window
from quotad.core.windows import latest_window_bounds, window_bounds

UTC_ZONE = zoneinfo.ZoneInfo("UTC")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
SAO_PAULO = zoneinfo.ZoneInfo("America/Sao_Paulo")
HAVANA = zoneinfo.ZoneInfo("America/Havana")
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")
LORD_HOWE = zoneinfo.ZoneInfo("Australia/Lord_Howe")

HOUR_S = 3600
CALENDAR = (Window.DAY, Window.WEEK, Window.MONTH)
TIMED = (Window.MINUTE, Window.HOUR, Window.DAY, Window.WEEK, Window.MONTH)


def ns(iso: str) -> int:
    """An ISO 8601 instant with its offset, in ns since the epoch."""
    return int(datetime.fromisoformat(iso).timestamp()) * S


def bounds(window: Window, zone: zoneinfo.ZoneInfo, iso: str) -> tuple[int, int | None]:
    return window_bounds(window, zone, ns(iso))


def local(zone: zoneinfo.ZoneInfo, at_ns: int) -> datetime:
    return datetime.fromtimestamp(at_ns // S, zone)


def local_date(zone: zoneinfo.ZoneInfo, at_ns: int) -> date:
    return local(zone, at_ns).date()


# --- UTC ----------------------------------------------------------------------------------

NOW = "2025-03-05T13:47:21+00:00"  # a Wednesday


@pytest.mark.parametrize("window, start, end", [
    (Window.MINUTE, "2025-03-05T13:47:00+00:00", "2025-03-05T13:48:00+00:00"),
    (Window.HOUR, "2025-03-05T13:00:00+00:00", "2025-03-05T14:00:00+00:00"),
    (Window.DAY, "2025-03-05T00:00:00+00:00", "2025-03-06T00:00:00+00:00"),
    (Window.WEEK, "2025-03-03T00:00:00+00:00", "2025-03-10T00:00:00+00:00"),
    (Window.MONTH, "2025-03-01T00:00:00+00:00", "2025-04-01T00:00:00+00:00"),
])
def test_each_window_in_utc(window: Window, start: str, end: str) -> None:
    assert bounds(window, UTC_ZONE, NOW) == (ns(start), ns(end))


def test_lifetime_window_starts_at_zero_and_never_ends() -> None:
    assert bounds(Window.LIFETIME, UTC_ZONE, NOW) == (0, None)
    assert bounds(Window.LIFETIME, NEW_YORK, NOW) == (0, None)


@pytest.mark.parametrize("window", TIMED)
def test_window_holds_its_first_instant_and_not_its_end(window: Window) -> None:
    start, end = window_bounds(window, UTC_ZONE, ns(NOW))
    assert window_bounds(window, UTC_ZONE, start) == (start, end)
    assert window_bounds(window, UTC_ZONE, end - 1) == (start, end)
    assert window_bounds(window, UTC_ZONE, end)[0] == end


def test_sub_second_now_is_in_the_window_of_its_second() -> None:
    start, end = window_bounds(Window.MINUTE, UTC_ZONE, ns("2025-03-05T13:47:59+00:00") + S - 1)
    assert (start, end) == (ns("2025-03-05T13:47:00+00:00"), ns("2025-03-05T13:48:00+00:00"))


def test_month_window_rolls_from_december_to_january() -> None:
    assert bounds(Window.MONTH, UTC_ZONE, "2025-12-31T23:59:59+00:00") == (
        ns("2025-12-01T00:00:00+00:00"), ns("2026-01-01T00:00:00+00:00"))
    assert bounds(Window.MONTH, UTC_ZONE, "2026-01-01T00:00:00+00:00") == (
        ns("2026-01-01T00:00:00+00:00"), ns("2026-02-01T00:00:00+00:00"))


def test_month_window_of_february_in_a_leap_year_is_29_days() -> None:
    start, end = bounds(Window.MONTH, UTC_ZONE, "2024-02-29T12:00:00+00:00")
    assert start == ns("2024-02-01T00:00:00+00:00") and end - start == 29 * 24 * HOUR_S * S


def test_week_window_starts_on_monday_even_when_now_is_sunday_night() -> None:
    assert bounds(Window.WEEK, UTC_ZONE, "2025-03-09T23:59:59+00:00") == (
        ns("2025-03-03T00:00:00+00:00"), ns("2025-03-10T00:00:00+00:00"))
    assert bounds(Window.WEEK, UTC_ZONE, "2025-03-10T00:00:00+00:00")[0] == ns(
        "2025-03-10T00:00:00+00:00")


# --- America/New_York: 23 h and 25 h days ---------------------------------------------------


def test_new_york_spring_forward_day_is_23_hours_from_local_midnight() -> None:
    start, end = bounds(Window.DAY, NEW_YORK, "2025-03-09T12:00:00-04:00")
    assert start == ns("2025-03-09T00:00:00-05:00")  # midnight EST
    assert end == ns("2025-03-10T00:00:00-04:00")    # midnight EDT
    assert end - start == 23 * HOUR_S * S


def test_new_york_fall_back_day_is_25_hours_from_local_midnight() -> None:
    start, end = bounds(Window.DAY, NEW_YORK, "2025-11-02T12:00:00-05:00")
    assert start == ns("2025-11-02T00:00:00-04:00")  # midnight EDT
    assert end == ns("2025-11-03T00:00:00-05:00")    # midnight EST
    assert end - start == 25 * HOUR_S * S


def test_new_york_hours_around_spring_forward_skip_the_missing_hour() -> None:
    assert bounds(Window.HOUR, NEW_YORK, "2025-03-09T01:30:00-05:00") == (
        ns("2025-03-09T01:00:00-05:00"), ns("2025-03-09T03:00:00-04:00"))
    assert ns("2025-03-09T03:00:00-04:00") - ns("2025-03-09T01:00:00-05:00") == HOUR_S * S
    assert bounds(Window.HOUR, NEW_YORK, "2025-03-09T03:00:00-04:00") == (
        ns("2025-03-09T03:00:00-04:00"), ns("2025-03-09T04:00:00-04:00"))


def test_new_york_repeated_hour_at_fall_back_is_two_windows() -> None:
    first = bounds(Window.HOUR, NEW_YORK, "2025-11-02T01:30:00-04:00")
    second = bounds(Window.HOUR, NEW_YORK, "2025-11-02T01:30:00-05:00")
    assert first == (ns("2025-11-02T01:00:00-04:00"), ns("2025-11-02T01:00:00-05:00"))
    assert second == (ns("2025-11-02T01:00:00-05:00"), ns("2025-11-02T02:00:00-05:00"))


def test_new_york_week_starts_monday_local_midnight_across_dst() -> None:
    start, end = bounds(Window.WEEK, NEW_YORK, "2025-03-09T12:00:00-04:00")  # a Sunday
    assert start == ns("2025-03-03T00:00:00-05:00")
    assert end == ns("2025-03-10T00:00:00-04:00")
    assert end - start == (7 * 24 - 1) * HOUR_S * S


def test_new_york_month_rolls_from_december_to_january_at_local_midnight() -> None:
    assert bounds(Window.MONTH, NEW_YORK, "2025-12-31T23:30:00-05:00") == (
        ns("2025-12-01T00:00:00-05:00"), ns("2026-01-01T00:00:00-05:00"))
    assert bounds(Window.MONTH, NEW_YORK, "2026-01-01T00:00:00-05:00")[0] == ns(
        "2026-01-01T00:00:00-05:00")


def test_new_york_month_with_spring_forward_is_one_hour_short() -> None:
    start, end = bounds(Window.MONTH, NEW_YORK, "2025-03-15T12:00:00-04:00")
    assert (start, end) == (ns("2025-03-01T00:00:00-05:00"), ns("2025-04-01T00:00:00-04:00"))
    assert end - start == (31 * 24 - 1) * HOUR_S * S


# --- zones where local midnight is skipped ---------------------------------------------------


def test_sao_paulo_day_whose_midnight_is_skipped_starts_at_its_first_instant() -> None:
    # 2018-11-04: clocks went from 00:00 (-03) to 01:00 (-02); the day began at 01:00 local
    start, end = bounds(Window.DAY, SAO_PAULO, "2018-11-04T12:00:00-02:00")
    assert start == ns("2018-11-04T01:00:00-02:00") == ns("2018-11-04T03:00:00+00:00")
    assert end == ns("2018-11-05T00:00:00-02:00")
    assert end - start == 23 * HOUR_S * S
    # the day before is 24 h and ends exactly where the short day begins
    assert bounds(Window.DAY, SAO_PAULO, "2018-11-03T12:00:00-03:00") == (
        ns("2018-11-03T00:00:00-03:00"), start)


def test_sao_paulo_fall_back_at_midnight_makes_a_25_hour_day() -> None:
    # 2019-02-17 00:00 (-02) became 2019-02-16 23:00 (-03): the 16th lasted 25 h
    start, end = bounds(Window.DAY, SAO_PAULO, "2019-02-16T23:30:00-03:00")
    assert start == ns("2019-02-16T00:00:00-02:00")
    assert end == ns("2019-02-17T00:00:00-03:00")
    assert end - start == 25 * HOUR_S * S


def test_havana_day_whose_midnight_is_skipped_starts_at_its_first_instant() -> None:
    # 2025-03-09: clocks went from 00:00 (-05) to 01:00 (-04)
    start, end = bounds(Window.DAY, HAVANA, "2025-03-09T12:00:00-04:00")
    assert start == ns("2025-03-09T01:00:00-04:00")
    assert end == ns("2025-03-10T00:00:00-04:00")
    assert bounds(Window.DAY, HAVANA, "2025-03-08T23:59:59-05:00")[1] == start
    # and a month that starts on such a day would start there too: the 1st is not, so
    assert bounds(Window.MONTH, HAVANA, "2025-03-09T12:00:00-04:00")[0] == ns(
        "2025-03-01T00:00:00-05:00")


def test_havana_day_with_repeated_midnight_starts_at_the_first_midnight() -> None:
    # 2025-11-02: clocks went from 01:00 (-04) back to 00:00 (-05): midnight happened twice
    start, end = bounds(Window.DAY, HAVANA, "2025-11-02T00:30:00-05:00")
    assert start == ns("2025-11-02T00:00:00-04:00")
    assert end == ns("2025-11-03T00:00:00-05:00")
    assert end - start == 25 * HOUR_S * S


# --- Asia/Kolkata: +05:30 -----------------------------------------------------------------


def test_kolkata_hour_windows_start_at_half_past_in_utc() -> None:
    start, end = bounds(Window.HOUR, KOLKATA, "2025-03-03T12:00:00+00:00")  # 17:30 IST
    assert (start, end) == (ns("2025-03-03T11:30:00+00:00"), ns("2025-03-03T12:30:00+00:00"))
    assert local(KOLKATA, start).strftime("%H:%M:%S") == "17:00:00"


def test_kolkata_minute_and_day_windows() -> None:
    assert bounds(Window.MINUTE, KOLKATA, "2025-03-03T12:00:42+00:00") == (
        ns("2025-03-03T12:00:00+00:00"), ns("2025-03-03T12:01:00+00:00"))
    assert bounds(Window.DAY, KOLKATA, "2025-03-03T12:00:00+00:00") == (
        ns("2025-03-02T18:30:00+00:00"), ns("2025-03-03T18:30:00+00:00"))


# --- Australia/Lord_Howe: 30-minute DST ---------------------------------------------------


def chain(window: Window, zone: zoneinfo.ZoneInfo, first_ns: int, last_ns: int) -> list:
    """Consecutive windows from the one holding first_ns to the one holding last_ns."""
    windows = [window_bounds(window, zone, first_ns)]
    while windows[-1][1] <= last_ns:
        windows.append(window_bounds(window, zone, windows[-1][1]))
    return windows


@pytest.mark.parametrize("around", ["2024-04-07T02:00:00+11:00", "2024-10-06T02:00:00+10:30"],
                         ids=["dst-end", "dst-start"])
@pytest.mark.parametrize("window", TIMED)
def test_lord_howe_bounds_never_raise_and_windows_are_contiguous(
        window: Window, around: str) -> None:
    first, last = ns(around) - 2 * 86400 * S, ns(around) + 2 * 86400 * S
    windows = chain(window, LORD_HOWE, first, last)
    for (_, end), (next_start, _) in zip(windows, windows[1:]):
        assert end == next_start
    for start, end in windows:
        assert start < end
    for probe in range(first, last, 300 * S):  # every 5 minutes: never raises, holds now
        start, end = window_bounds(window, LORD_HOWE, probe)
        assert start <= probe < end


def test_lord_howe_day_of_dst_end_is_24_and_a_half_hours() -> None:
    start, end = bounds(Window.DAY, LORD_HOWE, "2024-04-07T12:00:00+10:30")
    assert start == ns("2024-04-07T00:00:00+11:00") and end == ns("2024-04-08T00:00:00+10:30")
    assert end - start == 24 * HOUR_S * S + 1800 * S


@pytest.mark.parametrize("now, expected", [
    # DST end 2024-04-07 02:00 (+11) -> 01:30 (+10:30). 01:15 (+11) and the second 01:45
    # (+10:30) are in the same local hour 01, which began at 01:00 (+11) = 14:00 UTC and ends
    # at 02:00 (+10:30) = 15:30 UTC. (Regression: 01:45 used to get 14:30 UTC, which shows
    # 01:30 on the local clock.)
    ("2024-04-07T01:15:00+11:00", ("2024-04-07T01:00:00+11:00", "2024-04-07T02:00:00+10:30")),
    ("2024-04-07T01:45:00+10:30", ("2024-04-07T01:00:00+11:00", "2024-04-07T02:00:00+10:30")),
    # DST start 2024-10-06 02:00 (+10:30) -> 02:30 (+11): local 02:00 never shows, so the
    # hour that began at 01:00 (+10:30) = 14:30 UTC runs to 03:00 (+11) = 16:00 UTC.
    ("2024-10-06T01:15:00+10:30", ("2024-10-06T01:00:00+10:30", "2024-10-06T03:00:00+11:00")),
    ("2024-10-06T02:45:00+11:00", ("2024-10-06T01:00:00+10:30", "2024-10-06T03:00:00+11:00")),
], ids=["dst-end-first", "dst-end-repeated", "dst-start-before", "dst-start-after"])
def test_lord_howe_every_instant_of_an_hour_window_gets_that_same_window(
        now: str, expected: tuple[str, str]) -> None:
    start, end = bounds(Window.HOUR, LORD_HOWE, now)
    assert local(LORD_HOWE, start).minute == 0
    assert (start, end) == (ns(expected[0]), ns(expected[1]))
    assert window_bounds(Window.HOUR, LORD_HOWE, start) == (start, end)
    assert window_bounds(Window.HOUR, LORD_HOWE, end - 1) == (start, end)


# --- fall-back across local midnight (historical rules) -------------------------------------
# St. John's fell back at 00:01 NDT to 23:01 NST until 2011; Antarctica/Casey went from +11
# to +08 at 2010-03-05 02:00. The old date shows again for a while; those instants belong to
# the period that already began (regression: window_bounds used to raise AssertionError).


@pytest.mark.parametrize("zone, now, window, start, end", [
    ("America/St_Johns", "2009-11-01T02:31:00+00:00", Window.DAY,   # 2009-10-31 23:01 NST
     "2009-11-01T00:00:00-02:30", "2009-11-02T00:00:00-03:30"),
    ("America/St_Johns", "2009-11-01T02:29:59+00:00", Window.DAY,   # 2009-10-31 23:59:59 NDT
     "2009-10-31T00:00:00-02:30", "2009-11-01T00:00:00-02:30"),
    ("America/St_Johns", "2009-11-01T02:31:00+00:00", Window.MONTH,
     "2009-11-01T00:00:00-02:30", "2009-12-01T00:00:00-03:30"),
    ("America/St_Johns", "2009-11-01T02:31:00+00:00", Window.WEEK,  # a Sunday
     "2009-10-26T00:00:00-02:30", "2009-11-02T00:00:00-03:30"),
    ("Antarctica/Casey", "2010-03-04T15:00:00+00:00", Window.DAY,   # 2010-03-04 23:00 +08
     "2010-03-05T00:00:00+11:00", "2010-03-06T00:00:00+08:00"),
], ids=["st_johns-day-repeated", "st_johns-day-before", "st_johns-month", "st_johns-week",
        "casey-day"])
def test_fall_back_across_midnight_instants_belong_to_the_period_that_began(
        zone: str, now: str, window: Window, start: str, end: str) -> None:
    tz = zoneinfo.ZoneInfo(zone)
    assert window_bounds(window, tz, ns(now)) == (ns(start), ns(end))
    assert window_bounds(window, tz, ns(end))[0] == ns(end)
    assert window_bounds(window, tz, ns(start)) == (ns(start), ns(end))


# --- properties ---------------------------------------------------------------------------

ALL_ZONES = sorted(zoneinfo.available_timezones())
FROM_NS = 0
"""The server's clock: ns since the epoch, never before it."""
UNTIL_NS = ns("2100-01-01T00:00:00+00:00")


def first_instant_of_local_date(zone: zoneinfo.ZoneInfo, at_ns: int) -> bool:
    return local_date(zone, at_ns - S) != local_date(zone, at_ns)


def check_window(window: Window, zone: zoneinfo.ZoneInfo, now_ns: int) -> tuple[int, int]:
    start, end = window_bounds(window, zone, now_ns)
    assert start <= now_ns < end
    assert start % S == 0 and end % S == 0
    assert window_bounds(window, zone, end)[0] == end  # contiguous
    assert window_bounds(window, zone, start) == (start, end)  # the same for all its instants
    if window in CALENDAR:
        # begins at the first instant of its local date: a Monday, a 1st
        assert first_instant_of_local_date(zone, start)
        assert first_instant_of_local_date(zone, end)
        begins, today = local_date(zone, start), local_date(zone, now_ns)
        if begins > today:
            # the clock fell back across the period's start: the old date shows again, and
            # its instants belong to the period that already began
            assert start < now_ns
            today = begins
        if window is Window.DAY:
            assert begins == today
        elif window is Window.WEEK:
            assert begins.weekday() == 0
            assert begins == today - timedelta(days=today.weekday())
        else:
            assert begins.day == 1
            assert (begins.year, begins.month) == (today.year, today.month)
    elif local(zone, start).utcoffset() == local(zone, now_ns).utcoffset():
        # no offset change since the window began: the local clock showed :00 there
        shown = local(zone, start)
        assert shown.second == 0
        if window is Window.HOUR:
            assert shown.minute == 0
        assert end - start <= (3600 if window is Window.HOUR else 60) * S * 2
    return start, end


@settings(max_examples=400, deadline=None)
@given(zone_name=st.sampled_from(ALL_ZONES),
       now_ns=st.integers(min_value=FROM_NS, max_value=UNTIL_NS),
       window=st.sampled_from(TIMED))
def test_property_every_zone_window_holds_now_and_is_contiguous(
        zone_name: str, now_ns: int, window: Window) -> None:
    check_window(window, zoneinfo.ZoneInfo(zone_name), now_ns)


DST_ZONES = ["America/New_York", "America/Havana", "America/Sao_Paulo", "America/Santiago",
             "America/St_Johns", "Europe/London", "Europe/Berlin", "Asia/Tehran",
             "Australia/Sydney", "Australia/Lord_Howe", "Pacific/Chatham", "Pacific/Apia",
             "America/Asuncion", "Africa/Casablanca", "Antarctica/Troll", "Antarctica/Casey",
             "America/Moncton", "Asia/Pyongyang", "Pacific/Kiritimati"]
"""Zones with DST or odd offset changes since 1990: whole hours, 30 min (Lord Howe,
Pyongyang), 45-min offsets (Chatham), skipped midnights (Havana, Sao Paulo), fall-backs across
midnight (St. John's, Moncton, Casey), a skipped day (Kiritimati 1995, Apia 2011)."""


@functools.lru_cache(maxsize=None)
def transitions(zone_name: str, first_year: int = 1990, last_year: int = 2030) -> tuple[int, ...]:
    """Instants (s) where the zone's UTC offset changes, found by scanning and bisecting."""
    zone = zoneinfo.ZoneInfo(zone_name)

    def offset(at_s: int) -> timedelta | None:
        return datetime.fromtimestamp(at_s, zone).utcoffset()

    at = int(datetime(first_year, 1, 1, tzinfo=timezone.utc).timestamp())
    stop = int(datetime(last_year, 1, 1, tzinfo=timezone.utc).timestamp())
    found = []
    while at < stop:
        step = at + 12 * 3600
        if offset(step) != offset(at):
            low, high = at, step
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset(middle) == offset(at) else (low, middle)
            found.append(high)
        at = step
    return tuple(found)


def test_transition_finder_finds_new_york_dst_changes() -> None:
    found = transitions("America/New_York")
    assert ns("2025-03-09T07:00:00+00:00") // S in found
    assert ns("2025-11-02T06:00:00+00:00") // S in found
    assert len(found) == 2 * (2030 - 1990)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), zone_name=st.sampled_from(DST_ZONES), window=st.sampled_from(TIMED),
       delta_s=st.integers(min_value=-2 * 86400, max_value=2 * 86400))
def test_property_windows_near_dst_changes_hold_now_and_are_contiguous(
        data, zone_name: str, window: Window, delta_s: int) -> None:
    found = transitions(zone_name)
    assert found, zone_name  # every zone listed changed its offset since 1990
    at_s = data.draw(st.sampled_from(found)) + data.draw(st.sampled_from([0, delta_s]))
    check_window(window, zoneinfo.ZoneInfo(zone_name), at_s * S)


@settings(max_examples=300, deadline=None)
@given(zone_name=st.sampled_from(DST_ZONES), window=st.sampled_from(TIMED), data=st.data())
def test_property_windows_near_dst_changes_are_the_same_for_every_instant_in_them(
        zone_name: str, window: Window, data) -> None:
    """Every instant of a window maps to that window: windows never overlap (what the core's
    latest_window_bounds rests on)."""
    at_s = data.draw(st.sampled_from(transitions(zone_name))) + data.draw(
        st.integers(min_value=-3 * 3600, max_value=3 * 3600))
    zone = zoneinfo.ZoneInfo(zone_name)
    start, end = window_bounds(window, zone, at_s * S)
    inside = data.draw(st.integers(min_value=start, max_value=end - 1))
    assert window_bounds(window, zone, inside) == (start, end)
    assert window_bounds(window, zone, start) == (start, end)
    assert window_bounds(window, zone, end - 1) == (start, end)


@settings(max_examples=200, deadline=None)
@given(zone_name=st.sampled_from(DST_ZONES), window=st.sampled_from(TIMED), data=st.data())
def test_property_latest_window_bounds_answers_as_window_bounds_whatever_was_asked_before(
        zone_name: str, window: Window, data) -> None:
    """The core asks latest_window_bounds, which answers from the window it computed last
    for that window and zone: instants near a zone's offset changes, asked in any order,
    get what window_bounds computes (the test above is why)."""
    zone = zoneinfo.ZoneInfo(zone_name)
    around_s = data.draw(st.sampled_from(transitions(zone_name)))
    instants_s = data.draw(st.lists(
        st.integers(min_value=around_s - 2 * 86400, max_value=around_s + 2 * 86400),
        min_size=1, max_size=12))
    for at_s in instants_s:
        for at_ns in (at_s * S, at_s * S + S - 1):
            assert latest_window_bounds(window, zone, at_ns) == window_bounds(window, zone, at_ns)
