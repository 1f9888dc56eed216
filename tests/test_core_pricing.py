"""Costs per unit and soft limits in the pure core: real core, fake clock, no mocks.

A group with a cost counts amount x rate, the rate chosen by one metadata key and fixed on the
hold when it is taken; a soft group (enforce = false) counts and shows its overage but never
denies. Every run here is replayed into a fresh core to the same digest.
"""

from __future__ import annotations

import pytest

from core_helpers import (
    HOUR, S, Harness, digest, fields_of, group, plan, replay_all, view_tuple,
)
from quotad.core import limits
from quotad.core.errors import InvalidArgument
from quotad.core.plans import Cost, LimitGroup, Plan, Window
from quotad.core.values import replace
from quotad.storage.codec import (
    decode_finished_hold, decode_record, encode_finished_hold, encode_record, record_key,
    reservation_bytes,
)
from quotad.storage.snapshot import core_from_snapshot, snapshot_of

GPT4O, MINI = {"model": "gpt-4o"}, {"model": "gpt-4o-mini"}


def spend(quota: int = 1000, rates=(("gpt-4o", 10), ("gpt-4o-mini", 1)),
          default_rate: int | None = None, *, enforce: bool = True) -> LimitGroup:
    return replace(group("spend", quota, Window.DAY, ["openai.*"]), enforce=enforce,
                   cost=Cost(by="model", rates=tuple(rates), default_rate=default_rate))


def pricing_plan(*groups: LimitGroup) -> Plan:
    return plan("p", group("tokens", 10_000, Window.DAY, ["openai.*"]), *groups)


def replays_to_the_same_state(h: Harness) -> bool:
    return digest(h.replayed()) == h.digest()


# --- cost per unit ------------------------------------------------------------------------


def test_a_cost_counts_amount_times_the_rate_of_the_events_metadata_value() -> None:
    h = Harness().setup(pricing_plan(spend()), "alice")
    result = h.reserve("alice", 30, "openai.chat", GPT4O)
    assert [(v.key, v.held) for v in result.counters] == [("tokens", 30), ("spend", 300)]
    h.track("alice", 7, "openai.chat", MINI)
    assert (h.counter("alice", "spend").used, h.counter("alice", "tokens").used) == (7, 7)
    assert replays_to_the_same_state(h)


def test_an_unpriced_value_takes_the_default_rate_and_without_one_the_group_does_not_match():
    h = Harness().setup(pricing_plan(spend(default_rate=3)), "alice")
    assert [v.held for v in h.reserve("alice", 5, "openai.chat", {"model": "o1"}).counters] == [
        5, 15]
    assert [v.held for v in h.reserve("alice", 5, "openai.chat").counters] == [10, 30]
    h.upsert_plan(pricing_plan(spend()))  # no default any more
    for metadata in ({"model": "o1"}, {}):
        result = h.reserve("alice", 5, "openai.chat", metadata)
        assert [v.key for v in result.counters] == ["tokens"]
        assert h.track("alice", 1, "openai.chat", metadata).counters[0].key == "tokens"
    assert replays_to_the_same_state(h)


def test_a_cost_group_denies_by_its_counted_amount_all_or_nothing() -> None:
    h = Harness().setup(pricing_plan(spend(quota=100)), "alice")
    assert h.reserve("alice", 10, "openai.chat", GPT4O).allowed  # 100 of 100
    denied = h.reserve("alice", 1, "openai.chat", GPT4O)
    assert not denied.allowed and denied.denied_by == "spend"
    assert [view_tuple(v)[:4] for v in denied.counters] == [("tokens", 10_000, 0, 10),
                                                              ("spend", 100, 0, 100)]
    assert h.track("alice", 1, "openai.chat", GPT4O, enforce=True).denied_by == "spend"
    assert h.counter("alice", "tokens").used == 0


def test_release_and_expiry_return_the_counted_amount() -> None:
    h = Harness().setup(pricing_plan(spend()), "alice")
    released = h.reserve("alice", 4, "openai.chat", GPT4O)
    h.reserve("alice", 6, "openai.chat", GPT4O, ttl_ns=1 * S)
    assert h.counter("alice", "spend").held == 100
    h.release(released.reservation_id)
    assert h.counter("alice", "spend").held == 60
    h.advance(1 * S)
    h.expire()
    assert h.counter("alice", "spend").held == 0
    assert replays_to_the_same_state(h)


@pytest.mark.parametrize("actual, used", [(None, 200), (0, 0), (5, 50), (30, 300)])
def test_a_commit_counts_the_actual_amount_at_the_holds_rate(actual, used) -> None:
    h = Harness().setup(pricing_plan(spend()), "alice")
    hold = h.reserve("alice", 20, "openai.chat", GPT4O)
    result = h.commit(hold.reservation_id, actual)
    assert result.committed == (20 if actual is None else actual)
    assert [(v.key, v.used, v.held) for v in result.counters] == [
        ("tokens", used // 10, 0), ("spend", used, 0)]


def test_a_commit_after_the_rate_changed_counts_at_the_rate_the_hold_was_taken_at() -> None:
    h = Harness().setup(pricing_plan(spend()), "alice")
    hold = h.reserve("alice", 20, "openai.chat", GPT4O, ttl_ns=HOUR)
    late = h.reserve("alice", 3, "openai.chat", GPT4O, ttl_ns=1 * S)
    h.upsert_plan(pricing_plan(spend(rates=(("gpt-4o", 25),))))
    h.advance(1 * S)
    h.expire()  # the late hold returns its 30, not 75
    assert h.counter("alice", "spend").held == 200
    assert h.commit(hold.reservation_id, 10).counters[1].used == 100
    assert h.commit(late.reservation_id).counters[1].used == 130  # expired: counts anyway
    assert h.reserve("alice", 1, "openai.chat", GPT4O).counters[1].held == 25
    assert replays_to_the_same_state(h)


def test_a_hold_taken_under_a_cost_and_committed_after_a_snapshot_counts_at_its_rate() -> None:
    h = Harness().setup(pricing_plan(spend()), "alice")
    hold = h.reserve("alice", 20, "openai.chat", GPT4O)
    h.upsert_plan(pricing_plan(spend(rates=(("gpt-4o", 2),))))
    restored = core_from_snapshot(snapshot_of(h.core))
    assert digest(restored) == h.digest()
    h.core = restored
    assert h.commit(hold.reservation_id).counters[1].used == 200


def test_a_counted_amount_past_amount_max_is_invalid_argument_amount_and_changes_nothing():
    rate = 1024
    h = Harness().setup(plan("p", spend(quota=limits.QUOTA_MAX, rates=(("gpt-4o", rate),))),
                        "alice")
    fits = limits.AMOUNT_MAX // rate
    hold = h.reserve("alice", fits, "openai.chat", GPT4O)
    assert hold.counters[0].held == limits.AMOUNT_MAX
    before = h.digest()
    for command in (h.reserve_command("alice", fits + 1, "openai.chat", GPT4O, key="r"),
                    h.track_command("alice", fits + 1, "openai.chat", GPT4O, key="t"),
                    h.track_command("alice", -fits - 1, "openai.chat", GPT4O)):
        outcome = h.apply(command)
        assert isinstance(outcome.error, InvalidArgument) and fields_of(outcome.error) == {
            "amount"}, outcome
        assert "spend" in outcome.error.message and outcome.records == ()
    with pytest.raises(InvalidArgument) as refused:
        h.commit(hold.reservation_id, fits + 1)
    assert fields_of(refused.value) == {"amount"}
    assert h.digest() == before
    assert h.commit(hold.reservation_id, fits).counters[0].used == limits.AMOUNT_MAX
    # a refused request left no trace under its key
    assert h.reserve("alice", 1, "openai.chat", GPT4O, key="r").denied_by == "spend"


# --- soft limits --------------------------------------------------------------------------


def test_a_soft_group_never_denies_counts_and_shows_its_overage() -> None:
    h = Harness().setup(plan("p", group("tokens", 100, Window.DAY, ["openai.*"]),
                             replace(group("soft", 50, Window.DAY, ["openai.*"]),
                                     enforce=False)), "alice")
    first = h.reserve("alice", 80, "openai.chat")
    assert first.allowed
    assert [(v.key, v.held, v.remaining, v.overage) for v in first.counters] == [
        ("tokens", 80, 20, 0), ("soft", 80, 0, 30)]
    denied = h.reserve("alice", 30, "openai.chat")
    assert denied.denied_by == "tokens"  # the hard group still denies
    assert h.track("alice", 20, "openai.chat", enforce=True).allowed
    assert h.counter("alice", "soft").overage == 50
    h.commit(first.reservation_id, 10)
    usage = h.counter("alice", "soft")
    assert (usage.used, usage.held, usage.remaining, usage.overage) == (30, 0, 20, 0)
    assert replays_to_the_same_state(h)


def test_a_soft_groups_thresholds_fire_as_usual_including_100_percent_once() -> None:
    h = Harness().setup(plan("p", replace(group("soft", 100, Window.DAY), enforce=False)),
                        "alice")
    h.reserve("alice", 85)
    h.track("alice", 30, enforce=True)
    h.track("alice", 30, enforce=True)
    fired = [(e.limit_group_key, e.threshold_percent, e.amount)
             for r in h.records for e in r.events if e.kind == "threshold"]
    assert fired == [("soft", 80, 85), ("soft", 100, 115)]


def test_overage_is_used_plus_held_past_the_quota_for_every_group() -> None:
    h = Harness().setup(plan("p", group("tokens", 10, Window.DAY)), "alice")
    h.track("alice", 14)  # a recorded overage path
    assert (h.counter("alice", "tokens").remaining, h.counter("alice", "tokens").overage) == (
        0, 4)


# --- the plan's rules ---------------------------------------------------------------------


def _violations(**cost) -> set[str]:
    with pytest.raises(InvalidArgument) as refused:
        plan("p", replace(group("g", 1), cost=Cost(**cost)))
    return fields_of(refused.value)


def test_cost_rates_are_1_to_cost_rate_max_and_at_most_cost_rates_per_group_max() -> None:
    top = limits.COST_RATE_MAX
    plan("p", replace(group("g", 1), cost=Cost(by="m", rates=(("a", 1), ("b", top)),
                                               default_rate=top)))
    assert _violations(by="m", rates=(("a", 0),)) == {"plan.limit_groups[0].cost.rates"}
    assert _violations(by="m", rates=(("a", top + 1),)) == {"plan.limit_groups[0].cost.rates"}
    assert _violations(by="m", rates=(("a", True),)) == {"plan.limit_groups[0].cost.rates"}
    assert _violations(by="m", default_rate=0) == {"plan.limit_groups[0].cost.default_rate"}
    assert _violations(by="m", default_rate=top + 1) == {
        "plan.limit_groups[0].cost.default_rate"}
    most = tuple((f"v{i:03d}", 1) for i in range(limits.COST_RATES_PER_GROUP_MAX))
    plan("p", replace(group("g", 1), cost=Cost(by="m", rates=most)))
    assert _violations(by="m", rates=most + (("w", 1),)) == {"plan.limit_groups[0].cost.rates"}


def test_a_cost_names_a_metadata_key_and_unique_sorted_values_and_prices_something() -> None:
    key_max, value_max = limits.METADATA_KEY_BYTES_MAX, limits.METADATA_VALUE_BYTES_MAX
    plan("p", replace(group("g", 1), cost=Cost(by="k" * key_max, rates=(("v" * value_max, 1),))))
    assert _violations(by="", rates=(("a", 1),)) == {"plan.limit_groups[0].cost.by"}
    assert _violations(by="k" * (key_max + 1), rates=(("a", 1),)) == {
        "plan.limit_groups[0].cost.by"}
    assert _violations(by="m", rates=(("v" * (value_max + 1), 1),)) == {
        "plan.limit_groups[0].cost.rates"}
    assert _violations(by="m", rates=(("b", 1), ("a", 1))) == {"plan.limit_groups[0].cost.rates"}
    assert _violations(by="m", rates=(("a", 1), ("a", 2))) == {"plan.limit_groups[0].cost.rates"}
    assert _violations(by="m") == {"plan.limit_groups[0].cost.rates"}


def test_enforce_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgument) as refused:
        plan("p", replace(group("g", 1), enforce=0))
    assert fields_of(refused.value) == {"plan.limit_groups[0].enforce"}


# --- the log ------------------------------------------------------------------------------


def test_records_and_finished_hold_rows_keep_costs_soft_limits_and_hold_rates() -> None:
    """Through the log's own encoding: a replay of the decoded records gives the same state,
    and a finished hold read back from its row has the rates it was taken at."""
    h = Harness().setup(pricing_plan(spend(default_rate=2, enforce=False)), "alice")
    hold = h.reserve("alice", 20, "openai.chat", GPT4O, key="k")
    h.upsert_plan(pricing_plan(spend(rates=(("gpt-4o", 3),))))
    h.commit(hold.reservation_id, 4)
    decoded = [decode_record(record_key(r.sequence), encode_record(r)) for r in h.records]
    assert decoded == h.records
    assert decoded[0].command.plan == pricing_plan(spend(default_rate=2, enforce=False))
    assert digest(replay_all(decoded)) == h.digest()
    finished = h.core.apps["app"].reservations[hold.reservation_id]
    for age_ns in (0, limits.IDEMPOTENCY_RETENTION_NS_MIN):  # the compact row and the whole one
        row = encode_finished_hold(finished, h.core.sequence, 0, finished.created_at_ns + age_ns)
        read = decode_finished_hold(reservation_bytes(hold.reservation_id), row,
                                    h.core.sequence, lambda sequence: h.records[sequence - 1],
                                    lambda sequence: h.records[sequence - 1].now_ns)
        assert read == finished and [ref.rate for ref in read.holds] == [1, 10]
