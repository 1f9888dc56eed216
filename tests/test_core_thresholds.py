"""Threshold events in the pure core: a counter's used + held reaching 80 % and 100 % of its
quota is recorded once per user, group and window, in the log, so replay and snapshots keep
"once" true across restarts. Real core, fake clock."""

from __future__ import annotations


from core_helpers import MINUTE, S, Harness, digest, group, plan
from quotad.core import limits
from quotad.core.commands import AuditEvent, UpsertPlan
from quotad.core.plans import Window
from quotad.storage.snapshot import core_from_snapshot, snapshot_of


def _minute_harness(quota: int = 10) -> Harness:
    return Harness().setup(plan("p", group("calls", quota, Window.MINUTE)), "alice")


def _thresholds(h: Harness, since: int = 0) -> list[tuple[str, int, int]]:
    """(group, percent, window start) of every threshold event in records after `since`."""
    return [(e.limit_group_key, e.threshold_percent, e.window_start_ns)
            for r in h.records if r.sequence > since for e in r.events if e.kind == "threshold"]


def test_thresholds_are_the_documented_ones() -> None:
    assert limits.WATCH_THRESHOLDS_PERCENT == (80, 100)


def test_80_and_100_fire_once_per_window_and_again_in_the_next() -> None:
    h = _minute_harness(10)
    start = h.now
    for _ in range(7):
        h.track("alice", 1)
    assert _thresholds(h) == []
    h.track("alice", 1)  # 8 of 10
    assert _thresholds(h) == [("calls", 80, start)]
    h.track("alice", 1)
    h.track("alice", 1)  # 10 of 10
    h.track("alice", 5)  # over the quota (Track without enforce): nothing new
    h.track("alice", -9)
    h.track("alice", 9)  # back over both: still nothing, once per window
    assert _thresholds(h) == [("calls", 80, start), ("calls", 100, start)]

    h.advance(MINUTE)
    seen = h.records[-1].sequence
    h.track("alice", 10)  # a new window: both again, in ascending order, in one record
    assert _thresholds(h, seen) == [("calls", 80, start + MINUTE), ("calls", 100, start + MINUTE)]
    assert [e.kind for e in h.records[-1].events] == ["track", "threshold", "threshold"]


def test_a_hold_that_fills_the_quota_already_warns_and_commit_does_not_repeat_it() -> None:
    h = _minute_harness(10)
    hold = h.reserve("alice", 10)
    assert [e.kind for e in h.records[-1].events] == ["reserve", "threshold", "threshold"]
    threshold = h.records[-1].events[-1]
    assert threshold == AuditEvent(
        kind="threshold", app=h.app, user_id="alice", event_type="openai.chat", amount=10,
        limit_group_key="calls", threshold_percent=100, window_start_ns=h.now)
    h.commit(hold.reservation_id)
    assert [e.kind for e in h.records[-1].events] == ["commit"]


def test_a_commit_above_the_reserved_amount_crosses_a_threshold() -> None:
    h = _minute_harness(10)
    hold = h.reserve("alice", 2)
    h.commit(hold.reservation_id, 9)
    assert [(e.kind, e.threshold_percent, e.amount) for e in h.records[-1].events] == [
        ("commit", 0, 9), ("threshold", 80, 9)]


def test_quota_zero_groups_have_no_threshold_events() -> None:
    h = Harness().setup(plan("p", group("blocked", 0, Window.MINUTE),
                             group("open", 1000, Window.MINUTE)), "alice")
    h.track("alice", 5)
    assert _thresholds(h) == []


def test_a_lowered_quota_fires_only_on_the_next_change() -> None:
    h = _minute_harness(100)
    h.track("alice", 50)
    h.run(UpsertPlan(app=h.app, plan=plan("p", group("calls", 50, Window.MINUTE))))
    assert _thresholds(h) == []  # usage is at 100 % now, but no counter changed
    h.track("alice", -1)  # any change checks: 49 of 50 is past 80 %
    assert [p for _, p, _ in _thresholds(h)] == [80]


def test_expiry_and_release_check_thresholds_of_the_counters_they_change() -> None:
    h = _minute_harness(100)
    h.reserve("alice", 50, ttl_ns=1 * S)
    dropped = h.reserve("alice", 10)
    h.run(UpsertPlan(app=h.app, plan=plan("p", group("calls", 20, Window.MINUTE))))
    h.release(dropped.reservation_id)  # 50 of 20 held
    assert [(e.kind, e.threshold_percent) for e in h.records[-1].events] == [
        ("release", 0), ("threshold", 80), ("threshold", 100)]
    h.advance(2 * S)
    h.expire()
    assert [e.kind for e in h.records[-1].events] == ["expire"]


def test_replay_and_a_snapshot_keep_what_already_fired() -> None:
    h = _minute_harness(10)
    h.track("alice", 9)
    assert digest(h.replayed()) == h.digest()  # and replay checked every record's events
    restored = core_from_snapshot(snapshot_of(h.core))
    assert restored.apps[h.app].users["alice"].counters == h.core.apps[h.app].users[
        "alice"].counters
    outcome = restored.apply(h.track_command("alice", 1), h.now)
    # 100 % fires, 80 % (already fired before the snapshot) does not fire again
    assert [(e.kind, e.threshold_percent) for e in outcome.records[-1].events] == [
        ("track", 0), ("threshold", 100)]
