"""Rate buckets in the pure core: real core, fake clock, no mocks.

A RATE group is a token bucket of capacity `quota` refilled continuously over `period_ns`,
computed from the time the core is given alone, in integers. Every run here is replayed into
a fresh core to the same digest.
"""

from __future__ import annotations

import pytest

from core_helpers import MINUTE, S, Harness, digest, fields_of, group, plan, replay_all
from quotad.core import limits
from quotad.core.errors import InvalidArgument
from quotad.core.plans import Cost, Kind, LimitGroup, Plan, Window
from quotad.core.values import replace
from quotad.storage.codec import decode_record, encode_record, record_key
from quotad.storage.snapshot import core_from_snapshot, snapshot_of


def bucket(quota: int = 60, period_ns: int = MINUTE, *, key: str = "tpm",
           enforce: bool = True, cost: Cost | None = None) -> LimitGroup:
    return replace(group(key, quota, Window.LIFETIME, ["openai.*"]), kind=Kind.RATE,
                   period_ns=period_ns, enforce=enforce, cost=cost)


def bucket_plan(*groups: LimitGroup) -> Plan:
    return plan("p", *(groups or (bucket(),)))


def replays_to_the_same_state(h: Harness) -> bool:
    return digest(h.replayed()) == h.digest()


def available(h: Harness, key: str = "tpm") -> int:
    return h.counter("alice", key).remaining


# --- taking and giving back ---------------------------------------------------------------


def test_a_reserve_takes_tokens_and_a_full_bucket_denies() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    assert h.reserve("alice", 50).allowed and available(h) == 10
    denied = h.reserve("alice", 11)
    assert not denied.allowed and denied.denied_by == "tpm"
    assert available(h) == 10 and h.reserve("alice", 10).allowed and available(h) == 0
    assert replays_to_the_same_state(h)


def test_the_refill_is_exact_in_integers_and_carries_what_is_past_the_last_whole_token() -> None:
    h = Harness().setup(bucket_plan(bucket(quota=7, period_ns=3 * S)), "alice")
    h.track("alice", 7)
    start, seen = h.now, []
    for k in range(1, 10):  # 7 tokens every 3 s: one every 3/7 s, never a fraction in the state
        h.at(start + k * 3 * S // 9)
        seen.append(available(h))
    assert seen == [0, 1, 2, 3, 3, 4, 5, 6, 7]  # floor(7 x k/9)
    state = h.core.apps["app"].users["alice"].counter("tpm", Window.LIFETIME)
    assert type(state.used) is int and type(state.refill_carry) is int
    h.advance(10 * S)
    assert available(h) == 7  # never past the capacity
    assert replays_to_the_same_state(h)


def test_refilling_in_many_steps_gives_exactly_what_one_step_gives() -> None:
    steps, once = Harness().setup(bucket_plan(bucket(quota=1000, period_ns=7 * S)), "alice"), \
        Harness().setup(bucket_plan(bucket(quota=1000, period_ns=7 * S)), "alice")
    for h in (steps, once):
        h.track("alice", 1000)
    for _ in range(13):  # each track of 1 refills the bucket first, at that time
        steps.advance(S // 7 + 3)
        steps.track("alice", 1)
        steps.track("alice", -1)
    once.at(steps.now)
    assert available(steps) == available(once)
    assert steps.counter("alice", "tpm").full_at_ns == once.counter("alice", "tpm").full_at_ns


def test_usage_shows_the_tokens_available_now_and_when_the_bucket_is_full() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    assert h.counter("alice", "tpm").full_at_ns == h.now  # full already
    committed_at = h.now
    h.commit(h.reserve("alice", 30).reservation_id)
    view = h.counter("alice", "tpm")
    assert (view.kind, view.used, view.held, view.remaining) == (Kind.RATE, 30, 0, 30)
    assert view.full_at_ns == committed_at + 30 * S and view.resets_at_ns is None
    h.advance(10 * S)
    assert available(h) == 40 and h.counter("alice", "tpm").full_at_ns == committed_at + 30 * S


def test_a_denial_says_when_the_request_would_fit() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.track("alice", 60)
    denied = h.reserve("alice", 25)
    assert not denied.allowed and denied.fits_at_ns == h.now + 25 * S
    h.at(denied.fits_at_ns - 1)
    assert not h.reserve("alice", 25).allowed
    h.at(denied.fits_at_ns)
    assert h.reserve("alice", 25).allowed and denied.fits_at_ns is not None
    assert replays_to_the_same_state(h)


def test_a_request_that_only_the_end_of_holds_could_fit_has_no_fit_time() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.reserve("alice", 50)
    assert h.reserve("alice", 11).fits_at_ns is None  # 50 held stay held however long
    assert h.reserve("alice", 61).fits_at_ns is None  # past the capacity


def test_a_denied_track_with_enforce_says_when_it_would_fit() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.track("alice", 59)
    denied = h.track("alice", 3, enforce=True)
    assert not denied.allowed and denied.fits_at_ns == h.now + 2 * S


def test_a_commit_of_less_gives_the_difference_back_and_release_gives_everything() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    first, second = h.reserve("alice", 40), h.reserve("alice", 20)
    assert available(h) == 0
    assert h.commit(first.reservation_id, 15).returned == 25 and available(h) == 25
    h.release(second.reservation_id)
    assert available(h) == 45
    assert replays_to_the_same_state(h)


def test_an_expired_hold_gives_everything_back() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.reserve("alice", 60, ttl_ns=5 * S)
    assert available(h) == 0
    h.advance(5 * S)
    assert [e.reservation_id for e in h.expire().result.expired] and available(h) == 60
    assert replays_to_the_same_state(h)


def test_held_tokens_refill_from_their_commit_on() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    hold = h.reserve("alice", 60, ttl_ns=3600 * S)
    h.advance(30 * S)
    assert available(h) == 0  # the hold keeps its tokens while it lives
    h.commit(hold.reservation_id)
    h.advance(30 * S)
    assert available(h) == 30


def test_a_commit_of_more_than_reserved_counts_past_the_capacity_and_refills_from_there() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.commit(h.reserve("alice", 10).reservation_id, 90)
    view = h.counter("alice", "tpm")
    assert (view.used, view.remaining, view.overage) == (90, 0, 30)
    h.advance(31 * S)
    assert available(h) == 1


def test_a_bucket_combines_with_a_cost_a_soft_flag_and_a_calendar_quota_all_or_nothing() -> None:
    priced = bucket(quota=100, cost=Cost(by="model", rates=(("gpt-4o", 10),), default_rate=1))
    soft = bucket(quota=5, key="soft", enforce=False)
    daily = group("daily", 1000, Window.DAY, ["openai.*"])
    h = Harness().setup(plan("p", priced, soft, daily), "alice")
    assert h.reserve("alice", 8, metadata={"model": "gpt-4o"}).allowed  # 80 tokens, soft over
    assert (available(h), h.counter("alice", "soft").overage, available(h, "daily")) == (
        20, 3, 992)
    denied = h.reserve("alice", 3, metadata={"model": "gpt-4o"})
    assert denied.denied_by == "tpm" and available(h, "daily") == 992  # nothing held anywhere
    assert replays_to_the_same_state(h)


def test_a_calendar_quota_denial_fits_when_its_window_resets() -> None:
    h = Harness().setup(plan("p", group("hourly", 10, Window.HOUR)), "alice")
    h.track("alice", 10)
    denied = h.reserve("alice", 1)
    assert denied.fits_at_ns == h.counter("alice", "hourly").resets_at_ns
    assert h.reserve("alice", 11).fits_at_ns is None


def test_a_bucket_has_no_thresholds() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.track("alice", 60)
    assert not [e for r in h.records for e in r.events if e.kind == "threshold"]


def test_reads_change_nothing_and_a_denial_makes_no_record() -> None:
    h = Harness().setup(bucket_plan(), "alice")
    h.track("alice", 60)
    h.advance(7 * S)
    before, records = h.digest(), len(h.records)
    h.usage("alice")
    h.reserve("alice", 60)
    assert h.digest() == before and len(h.records) == records


# --- replay, the log and snapshots --------------------------------------------------------


def test_a_bucket_replays_through_the_log_encoding_and_a_snapshot_to_the_same_state() -> None:
    h = Harness().setup(bucket_plan(bucket(quota=13, period_ns=11 * S)), "alice")
    for step in range(20):
        h.advance(S // 3 + step)
        outcome = h.reserve("alice", 1 + step % 4, ttl_ns=2 * S)
        if outcome.allowed and step % 3 == 0:
            h.commit(outcome.reservation_id, step % 2)
        h.expire()
    h.advance(3 * S)  # every hold has expired
    h.track("alice", 13)
    denied = h.reserve("alice", 5, key="denied")  # a keyed answer: the log keeps it whole
    assert denied.fits_at_ns is not None and denied.counters[0].full_at_ns is not None
    assert h.track("alice", 5, enforce=True, key="refused").fits_at_ns == denied.fits_at_ns
    decoded = [decode_record(record_key(r.sequence), encode_record(r)) for r in h.records]
    assert decoded == h.records
    assert digest(replay_all(decoded)) == h.digest()
    assert digest(core_from_snapshot(snapshot_of(h.core))) == h.digest()


# --- validation ---------------------------------------------------------------------------


def _violations(**changes: object) -> set[str]:
    with pytest.raises(InvalidArgument) as refused:
        plan("p", replace(bucket(), **changes))
    return fields_of(refused.value)


def test_a_rate_groups_period_is_within_its_limits_and_it_has_no_calendar_window() -> None:
    plan("p", bucket(period_ns=limits.RATE_PERIOD_NS_MIN))
    plan("p", bucket(period_ns=limits.RATE_PERIOD_NS_MAX))
    field = "plan.limit_groups[0]"
    assert _violations(period_ns=limits.RATE_PERIOD_NS_MIN - 1) == {f"{field}.period"}
    assert _violations(period_ns=limits.RATE_PERIOD_NS_MAX + 1) == {f"{field}.period"}
    assert _violations(period_ns=0) == {f"{field}.period"}
    assert _violations(window=Window.MINUTE) == {f"{field}.window"}
    with pytest.raises(InvalidArgument) as refused:
        plan("p", replace(group("g", 1), period_ns=MINUTE))
    assert fields_of(refused.value) == {f"{field}.period"}
