"""Credit balances in the pure core: real core, fake clock, no mocks.

A BALANCE group's quota is the sum of the user's live grants, spent by priority, then
earliest expiry, then oldest (core.balances states every rule). Every run here is replayed
into a fresh core to the same digest.
"""

from __future__ import annotations

import pytest

from core_helpers import (
    DAY, HOUR, MINUTE, S, T0, Harness, digest, fields_of, group, plan, replay_all,
)
from quotad.core import limits
from quotad.core.commands import GrantCredits, GrantResult, ListGrants
from quotad.core.errors import InvalidArgument, ResourceExhausted
from quotad.core.plans import Cost, Kind, LimitGroup, Plan, RecurringGrant, Window
from quotad.core.values import replace
from quotad.storage.codec import decode_record, encode_record, record_key
from quotad.storage.snapshot import core_from_snapshot, snapshot_of
from quotad_contract.errors import ErrorReason


def balance(key: str = "credits", *, grant: RecurringGrant | None = None,
            enforce: bool = True, cost: Cost | None = None) -> LimitGroup:
    return replace(group(key, 0, Window.LIFETIME, ["openai.*"]), kind=Kind.BALANCE,
                   grant=grant, enforce=enforce, cost=cost)


def balance_plan(*groups: LimitGroup) -> Plan:
    return plan("p", *(groups or (balance(),)))


def grant(h: Harness, amount: int, *, user: str = "alice", key: str = "credits",
          expires_at_ns: int | None = None, priority: int = 0,
          idempotency_key: str = "") -> GrantResult:
    return h.run(GrantCredits(app=h.app, user_id=user, group_key=key, amount=amount,
                              expires_at_ns=expires_at_ns, priority=priority,
                              idempotency_key=idempotency_key))


def remaining_by_grant(h: Harness, user: str = "alice") -> dict[str, int]:
    result = h.run(ListGrants(app=h.app, user_id=user))
    return {g.grant_id: g.remaining for g in result.grants}


def available(h: Harness, user: str = "alice", key: str = "credits") -> int:
    return h.counter(user, key).remaining


def replays_to_the_same_state(h: Harness) -> bool:
    return digest(h.replayed()) == h.digest()


# --- granting and the counter -------------------------------------------------------------


def test_a_balance_is_the_sum_of_its_grants_and_a_reserve_past_it_is_denied() -> None:
    h = Harness().setup(balance_plan(), "alice")
    assert available(h) == 0 and not h.reserve("alice", 1).allowed
    first = grant(h, 100)
    assert (first.counter.quota, first.counter.remaining, first.counter.kind) == (
        100, 100, Kind.BALANCE)
    grant(h, 50)
    assert h.counter("alice", "credits").quota == 150
    assert h.reserve("alice", 120).allowed and available(h) == 30
    denied = h.reserve("alice", 31)
    assert not denied.allowed and denied.denied_by == "credits" and denied.fits_at_ns is None
    assert replays_to_the_same_state(h)


def test_spending_takes_priority_then_earliest_expiry_then_oldest() -> None:
    h = Harness().setup(balance_plan(), "alice")
    oldest = grant(h, 10).grant.grant_id
    newer = grant(h, 10).grant.grant_id
    expiring_late = grant(h, 10, expires_at_ns=T0 + 2 * DAY).grant.grant_id
    expiring_soon = grant(h, 10, expires_at_ns=T0 + DAY).grant.grant_id
    urgent = grant(h, 10, priority=0).grant.grant_id
    low = grant(h, 10, priority=5, expires_at_ns=T0 + HOUR).grant.grant_id
    expected_order = [expiring_soon, expiring_late, oldest, newer, urgent, low]
    # urgent has priority 0 like the others, no expiry, and is newer than `newer`
    for index, grant_id in enumerate(expected_order):
        h.track("alice", 10)
        left = remaining_by_grant(h)
        assert left[grant_id] == 0, (index, left)
        assert all(left[later] == 10 for later in expected_order[index + 1:]), (index, left)
    assert replays_to_the_same_state(h)


def test_a_commit_consumes_the_actual_amount_in_spend_order_and_releases_its_hold() -> None:
    h = Harness().setup(balance_plan(), "alice")
    first = grant(h, 30, priority=1).grant.grant_id
    second = grant(h, 100, priority=2).grant.grant_id
    hold = h.reserve("alice", 80)
    assert available(h) == 50 and remaining_by_grant(h) == {first: 30, second: 100}
    committed = h.commit(hold.reservation_id, 45)
    assert committed.returned == 35
    assert remaining_by_grant(h) == {first: 0, second: 85}
    view = h.counter("alice", "credits")
    assert (view.quota, view.used, view.held, view.remaining) == (130, 45, 0, 85)
    assert replays_to_the_same_state(h)


def test_a_release_or_hold_expiry_gives_the_whole_hold_back() -> None:
    h = Harness().setup(balance_plan(), "alice")
    grant(h, 100)
    released = h.reserve("alice", 60)
    h.release(released.reservation_id)
    assert available(h) == 100
    h.reserve("alice", 70, ttl_ns=10 * S)
    assert available(h) == 30
    h.advance(10 * S)
    h.expire()
    assert available(h) == 100
    assert replays_to_the_same_state(h)


# --- refunds ------------------------------------------------------------------------------


def test_a_refund_returns_to_the_grants_newest_consumption_first() -> None:
    h = Harness().setup(balance_plan(), "alice")
    standing = grant(h, 100, priority=5).grant.grant_id
    h.track("alice", 60)  # 60 from the standing grant
    promo = grant(h, 50, priority=1).grant.grant_id
    h.track("alice", 30)  # 30 from the promo grant, spent first now: the newest consumption
    assert remaining_by_grant(h) == {standing: 40, promo: 20}
    h.track("alice", -40)  # 30 back to promo (newest), then 10 to standing
    assert remaining_by_grant(h) == {standing: 50, promo: 50}
    h.track("alice", -1000)  # never below nothing consumed
    assert remaining_by_grant(h) == {standing: 100, promo: 50}
    assert h.counter("alice", "credits").used == 0
    assert replays_to_the_same_state(h)


def test_a_refund_that_would_land_on_an_expired_grant_is_lost() -> None:
    h = Harness().setup(balance_plan(), "alice")
    lasting = grant(h, 100).grant.grant_id
    h.track("alice", 20)  # from `lasting`, taken first
    soon = grant(h, 50, expires_at_ns=T0 + HOUR).grant.grant_id
    h.track("alice", 30)  # the expiring grant goes first: 30 from `soon`
    assert remaining_by_grant(h) == {soon: 20, lasting: 80}
    h.at(T0 + HOUR)
    h.expire()
    assert remaining_by_grant(h) == {soon: 0, lasting: 80}
    h.track("alice", -40)  # 30 would go back to `soon`: lost; then 10 to `lasting`
    assert remaining_by_grant(h) == {lasting: 90}  # `soon` is spent and gone: no refund left
    assert available(h) == 90
    assert replays_to_the_same_state(h)


def test_what_no_grant_covers_is_owed_and_the_next_grant_pays_it_first() -> None:
    h = Harness().setup(balance_plan(), "alice")
    grant(h, 10)
    h.track("alice", 25)  # without enforce: recorded past the balance
    view = h.counter("alice", "credits")
    assert (view.quota, view.used, view.remaining, view.overage) == (10, 25, 0, 15)
    topped = grant(h, 100)
    assert topped.grant.remaining == 85 and topped.counter.remaining == 85
    assert replays_to_the_same_state(h)


# --- expiry -------------------------------------------------------------------------------


def test_expiry_drops_only_the_unheld_remainder_and_a_commit_still_consumes_the_rest() -> None:
    h = Harness().setup(balance_plan(), "alice")
    soon = grant(h, 100, expires_at_ns=T0 + 30 * S).grant.grant_id
    h.track("alice", 10)
    hold = h.reserve("alice", 60, ttl_ns=3600 * S)
    h.at(T0 + 30 * S)
    expired = h.expire()
    assert [g.grant_id for g in expired.records[0].command.grants] == [soon]
    grants = {g.grant_id: g for g in h.run(ListGrants(app=h.app, user_id="alice")).grants}
    assert grants[soon].expired and grants[soon].remaining == 60  # kept for the hold
    view = h.counter("alice", "credits")
    assert (view.quota, view.used, view.held, view.remaining) == (60, 0, 60, 0)
    h.commit(hold.reservation_id, 50)  # 50 from what the grant kept, the 10 left dropped
    view = h.counter("alice", "credits")
    assert (view.quota, view.used, view.held, view.remaining) == (0, 0, 0, 0)
    assert replays_to_the_same_state(h)


def test_a_hold_released_after_its_grant_expired_leaves_nothing_behind() -> None:
    h = Harness().setup(balance_plan(), "alice")
    grant(h, 100, expires_at_ns=T0 + 30 * S)
    lasting = grant(h, 20).grant.grant_id
    hold = h.reserve("alice", 110, ttl_ns=3600 * S)
    h.at(T0 + 30 * S)
    h.expire()  # 10 available then: dropped; 90 kept for the hold
    assert h.counter("alice", "credits").remaining == 0
    h.release(hold.reservation_id)
    assert remaining_by_grant(h) == {lasting: 20} or available(h) == 20
    assert available(h) == 20
    assert replays_to_the_same_state(h)


def test_a_grant_expires_by_itself_as_a_logged_change_before_the_next_command() -> None:
    h = Harness().setup(balance_plan(), "alice")
    grant(h, 100, expires_at_ns=T0 + MINUTE)
    assert h.core.next_expiry_ns() == T0 + MINUTE
    h.at(T0 + MINUTE)
    outcome = h.apply(h.reserve_command("alice", 1))
    assert not outcome.result.allowed
    assert [type(r.command).__name__ for r in outcome.records] == ["ExpireHolds"]
    assert [e.kind for e in outcome.records[0].events] == ["expire_grant"]
    assert outcome.records[0].events[0].amount == 100
    assert h.core.next_expiry_ns() is None
    assert replays_to_the_same_state(h)


# --- recurring grants ---------------------------------------------------------------------


def test_a_recurring_grant_is_made_each_window_with_its_rollover_capped() -> None:
    monthly = RecurringGrant(amount=1000, every=Window.DAY, rollover_max=200)
    h = Harness().setup(balance_plan(balance(grant=monthly)), "alice", time_zone="Europe/Paris")
    view = h.counter("alice", "credits")
    assert view.quota == 1000 and view.resets_at_ns is not None
    day_end = view.resets_at_ns
    h.track("alice", 900)  # 100 left: all of it rolls over
    h.at(day_end)
    assert h.counter("alice", "credits").quota == 1100
    h.track("alice", 100)  # 1000 left of 1100: 200 roll over
    second_end = h.counter("alice", "credits").resets_at_ns
    h.at(second_end)
    assert h.counter("alice", "credits").quota == 1200
    grants = h.run(ListGrants(app=h.app, user_id="alice")).grants
    assert [(g.amount, g.recurring) for g in grants if not g.expired] == [(1200, True)]
    assert replays_to_the_same_state(h)


def test_a_window_without_a_change_rolls_over_rollover_max_and_reads_change_nothing() -> None:
    daily = RecurringGrant(amount=100, every=Window.DAY, rollover_max=30)
    h = Harness().setup(balance_plan(balance(grant=daily)), "alice")
    h.track("alice", 100)  # today's all spent
    before = h.digest()
    h.advance(3 * DAY)
    assert h.counter("alice", "credits").quota == 130  # read only
    assert h.digest() == before
    h.track("alice", 1)
    assert h.counter("alice", "credits").remaining == 129
    assert replays_to_the_same_state(h)


def test_recurring_windows_start_in_the_users_time_zone() -> None:
    daily = RecurringGrant(amount=10, every=Window.DAY)
    h = Harness().setup(balance_plan(balance(grant=daily)), "tokyo", time_zone="Asia/Tokyo")
    resets_at = h.counter("tokyo", "credits").resets_at_ns
    assert resets_at is not None and (resets_at // S + 9 * 3600) % 86400 == 0


# --- limits and refusals ------------------------------------------------------------------


def test_granting_is_refused_past_its_limits_with_nothing_changed() -> None:
    h = Harness().setup(plan("p", balance(), group("tokens", 10)), "alice")
    before = h.digest()
    with pytest.raises(InvalidArgument) as bad_group:
        grant(h, 10, key="tokens")
    assert fields_of(bad_group.value) == {"group_key"}
    with pytest.raises(InvalidArgument) as past:
        grant(h, 10, expires_at_ns=T0)
    assert fields_of(past.value) == {"expires_at"}
    with pytest.raises(InvalidArgument) as bad:
        GrantCredits(app="app", user_id="", group_key="", amount=0, priority=-1,
                     expires_at_ns=-1)
    assert fields_of(bad.value) == {"user_id", "group_key", "amount", "priority", "expires_at"}
    with pytest.raises(InvalidArgument):
        GrantCredits(app="app", user_id="a", group_key="credits",
                     amount=limits.GRANT_AMOUNT_MAX + 1)
    assert h.digest() == before
    for _ in range(limits.GRANTS_PER_BALANCE_MAX):
        grant(h, 1)
    full = h.digest()
    with pytest.raises(ResourceExhausted) as too_many:
        grant(h, 1)
    assert too_many.value.reason is ErrorReason.TOO_MANY_GRANTS and h.digest() == full
    h.track("alice", 1)  # one spent: room again
    grant(h, 1)


def test_plans_refuse_balance_groups_that_carry_a_quota_window_or_bad_grant() -> None:
    with pytest.raises(InvalidArgument) as bad:
        balance_plan(replace(balance(grant=RecurringGrant(amount=10, every=Window.LIFETIME,
                                                          rollover_max=11, priority=-1)),
                             quota=5, window=Window.DAY))
    assert fields_of(bad.value) == {
        "plan.limit_groups[0].quota", "plan.limit_groups[0].window",
        "plan.limit_groups[0].grant.every", "plan.limit_groups[0].grant.rollover_max",
        "plan.limit_groups[0].grant.priority"}
    with pytest.raises(InvalidArgument) as not_balance:
        plan("p", replace(group("t", 5), grant=RecurringGrant(amount=1, every=Window.DAY)))
    assert fields_of(not_balance.value) == {"plan.limit_groups[0].grant"}


def test_a_repeated_grant_with_its_key_gets_the_first_answer_and_grants_once() -> None:
    h = Harness().setup(balance_plan(), "alice")
    first = grant(h, 100, idempotency_key="order-1")
    again = grant(h, 100, idempotency_key="order-1")
    assert again == first and h.counter("alice", "credits").quota == 100
    assert replays_to_the_same_state(h)


def test_a_cost_counts_on_a_balance_and_soft_balances_never_deny() -> None:
    priced = balance(cost=Cost(by="model", rates=(("big", 10),), default_rate=1))
    h = Harness().setup(balance_plan(priced, balance("soft", enforce=False)), "alice")
    grant(h, 100)
    denied = h.reserve("alice", 11, metadata={"model": "big"})  # counts 110 here
    assert not denied.allowed and denied.denied_by == "credits"
    grant(h, 10)
    assert h.reserve("alice", 11, metadata={"model": "big"}).allowed
    assert available(h) == 0 and h.counter("alice", "soft").overage == 11
    assert replays_to_the_same_state(h)


# --- the log and snapshots ----------------------------------------------------------------


def test_the_log_and_a_snapshot_carry_grants_expiries_and_keyed_answers() -> None:
    daily = RecurringGrant(amount=100, every=Window.DAY, rollover_max=40, priority=2)
    h = Harness().setup(balance_plan(balance(grant=daily)), "alice", time_zone="US/Pacific")
    keyed = grant(h, 500, expires_at_ns=T0 + MINUTE, priority=1, idempotency_key="order-7")
    assert keyed.grant.expires_at_ns == T0 + MINUTE and keyed.grant.priority == 1
    grant(h, 20)
    hold = h.reserve("alice", 550, ttl_ns=HOUR)
    h.track("alice", 60)
    h.at(T0 + MINUTE)
    h.expire()
    h.commit(hold.reservation_id, 500)
    h.track("alice", -25, key="refund-1")
    h.advance(DAY)
    h.track("alice", 5)
    decoded = [decode_record(record_key(r.sequence), encode_record(r)) for r in h.records]
    assert decoded == h.records
    assert any(r.command.__class__.__name__ == "ExpireHolds" and r.command.grants
               for r in decoded)
    assert digest(replay_all(decoded)) == h.digest()
    restored = core_from_snapshot(snapshot_of(h.core))
    assert digest(restored) == h.digest()
    assert list(restored.grant_expiry) == list(h.core.grant_expiry)


# --- thresholds (what WatchUsage carries) ---------------------------------------------------


def test_thresholds_fire_on_a_balance_and_a_grant_re_arms_those_it_drops_below() -> None:
    h = Harness().setup(balance_plan(), "alice")
    grant(h, 100)

    def crossed(outcome_records) -> list[int]:
        return [e.threshold_percent for r in outcome_records for e in r.events
                if e.kind == "threshold"]

    assert crossed(h.apply(h.track_command("alice", 79)).records) == []
    assert crossed(h.apply(h.track_command("alice", 1)).records) == [80]
    assert crossed(h.apply(h.reserve_command("alice", 20)).records) == [100]  # a hold counts
    assert crossed(h.apply(h.track_command("alice", -1)).records) == []  # once, until re-armed
    outcome = h.apply(GrantCredits(app=h.app, user_id="alice", group_key="credits",
                                   amount=100))
    assert crossed(outcome.records) == []  # 99 of 200: below both again
    assert crossed(h.apply(h.track_command("alice", 61)).records) == [80]  # 160 of 200
    assert replays_to_the_same_state(h)


def test_a_plan_edit_that_makes_a_group_a_balance_or_no_longer_one_keeps_live_holds_whole(
) -> None:
    lifetime = replace(group("credits", 100, Window.LIFETIME, ["openai.*"]))
    h = Harness().setup(plan("p", lifetime), "alice")
    as_quota = h.reserve("alice", 30, ttl_ns=HOUR)
    h.track("alice", 10)
    h.upsert_plan(balance_plan())  # the same key and window, now a balance
    view = h.counter("alice", "credits")
    assert (view.kind, view.quota, view.used, view.held) == (Kind.BALANCE, 0, 0, 30)
    grant(h, 50)
    assert h.reserve("alice", 21).allowed is False and available(h) == 20
    as_balance = h.reserve("alice", 20, ttl_ns=HOUR)
    h.release(as_quota.reservation_id)  # given back to the counter it now is
    assert h.counter("alice", "credits").held == 20
    h.upsert_plan(plan("p", lifetime))  # and back to a quota
    view = h.counter("alice", "credits")
    assert (view.kind, view.quota, view.used, view.held) == (Kind.QUOTA, 100, 0, 20)
    h.commit(as_balance.reservation_id, 5)
    assert (h.counter("alice", "credits").used, h.counter("alice", "credits").held) == (5, 0)
    assert replays_to_the_same_state(h)


def test_spent_grants_past_their_bound_fold_into_one_count_that_refunds_reach_and_lose(
) -> None:
    h = Harness().setup(balance_plan(), "alice")
    spent_max = limits.SPENT_GRANTS_PER_BALANCE_MAX
    first = grant(h, 10).grant.grant_id
    h.track("alice", 10)  # the first grant spent: the one taken from longest ago
    for _ in range(spent_max):
        grant(h, 1)
        h.track("alice", 1)
    counter = h.core.apps[h.app].users["alice"].counter("credits", Window.LIFETIME)
    balance_state = counter.balance
    assert balance_state is not None
    assert len(balance_state.grants) == spent_max and first not in remaining_by_grant(h)
    assert balance_state.forgotten_consumed == 10
    standing = grant(h, 100).grant.grant_id
    h.track("alice", -(spent_max + 4))  # every later take back, then 4 to the forgotten one
    assert balance_state.forgotten_consumed == 6 and remaining_by_grant(h)[standing] == 100
    assert available(h) == 100 + spent_max  # what reached the forgotten grant is lost
    assert replays_to_the_same_state(h)
