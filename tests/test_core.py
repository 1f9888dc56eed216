"""Unit tests of the pure core (quotad.core.Core): real core, fake clock, no mocks.

Each test drives the core through `apply(command, now_ns)` (via core_helpers.Harness) and
checks the answers, the counters and the records against protos/DESIGN.md's contract.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from core_helpers import (
    APP, DAY, HOUR, MINUTE, S, T0, Harness, digest, fields_of, group, plan, replay_all, rid,
    view_tuple,
)
from quotad.core import limits
from quotad.core.commands import (
    Commit, DeletePlan, ExpiredHold, ExpireHolds, Extend, GetUsage, Release, Reserve, UpsertPlan,
    UpsertSubscription,
)
from quotad.core import machine
from quotad.core.machine import Core
from quotad.core.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
    ResourceExhausted,
)
from quotad.core.plans import Plan, Window
from quotad.core.values import replace

TTL = limits.TTL_NS_DEFAULT


def chat_plan(tokens: int = 1000, premium: int = 100, plan_id: str = "pro") -> Plan:
    """`tokens` counts every LLM call; `premium` only gpt-4o / gpt-4-turbo on OpenAI."""
    return plan(
        plan_id,
        group("tokens", tokens, Window.DAY, ["openai.*", "anthropic.*"]),
        group("premium", premium, Window.DAY, ["openai.*"],
              {"model": ["gpt-4o", "gpt-4-turbo"]}),
    )


GPT4O = {"model": "gpt-4o"}


@pytest.fixture
def h() -> Harness:
    return Harness().setup(chat_plan(), "alice")


# --- Reserve: all or nothing --------------------------------------------------------------


def test_reserve_holds_the_amount_on_every_matched_group(h: Harness) -> None:
    result = h.reserve("alice", 30, "openai.chat", GPT4O)
    assert result.allowed and result.denied_by == ""
    assert result.reservation_id.startswith("rsv_")
    assert result.expires_at_ns == T0 + TTL
    assert [(v.key, v.used, v.held, v.remaining) for v in result.counters] == [
        ("tokens", 0, 30, 970), ("premium", 0, 30, 70)]
    assert h.counter("alice", "tokens").held == 30
    assert h.counter("alice", "premium").held == 30


def test_users_whose_counters_came_in_one_order_share_one_layout_and_never_change_it() -> None:
    """A user's counters are a tuple, placed by a layout that every user whose counters came
    in the same order shares (no dict of its own: ~170 bytes a user of two counters),
    whichever command made them; a user's new slot gives it the layout with that slot, and
    the layout it had stays as it was for the others."""
    h = Harness().setup(chat_plan(), "alice", "bob", "carol", "dave")
    h.reserve("alice", 10, "openai.chat", GPT4O)
    h.track("bob", 5, "openai.chat", GPT4O)
    h.commit(h.reserve("carol", 7, "openai.chat", GPT4O).reservation_id)
    h.track("dave", 3, "anthropic.chat", {})  # tokens only
    users = h.core.apps[APP].users
    only_tokens = users["dave"].layout
    assert list(only_tokens) == [("tokens", Window.DAY)]
    h.track("dave", 2, "openai.chat", GPT4O)  # premium too, after tokens: alice's order
    h.advance(DAY)  # a new window: the counters are replaced, in their places
    h.track("alice", 1, "openai.chat", GPT4O)
    assert list(only_tokens) == [("tokens", Window.DAY)]
    assert list(users["alice"].layout) == [("tokens", Window.DAY), ("premium", Window.DAY)]
    assert len({id(users[name].layout) for name in ("alice", "bob", "carol", "dave")}) == 1
    assert users["alice"].counter("tokens", Window.DAY).used == 1  # the new window's
    assert users["carol"].counter("tokens", Window.DAY).used == 7  # the window before's
    assert [c.used for c in users["dave"].counters] == [5, 2]
    assert users["dave"].counter("tokens", Window.HOUR) is None


def test_the_shared_counter_layouts_stay_within_their_limit_and_counters_stay_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At COUNTER_LAYOUTS_MAX the layouts are forgotten and made again: a user keeps the
    layout it has, and every counter is still filed where it belongs."""
    monkeypatch.setattr(limits, "COUNTER_LAYOUTS_MAX", 1)
    monkeypatch.setattr(machine, "_layouts", {})  # shared by every core: as a process starts
    h = Harness().setup(chat_plan(), "alice", "bob")
    for user in ("alice", "bob", "alice"):
        h.track(user, 5, "openai.chat", GPT4O)
        assert len(machine._layouts) == 1
    assert [(h.counter(u, "tokens").used, h.counter(u, "premium").used)
            for u in ("alice", "bob")] == [(10, 10), (5, 5)]
    users = h.core.apps[APP].users
    assert list(users["alice"].layout) == list(users["bob"].layout) == [
        ("tokens", Window.DAY), ("premium", Window.DAY)]


def test_reserve_denied_by_first_group_without_room_holds_nothing_anywhere() -> None:
    h = Harness().setup(plan("p",
                             group("big", 100, Window.DAY),
                             group("small", 10, Window.HOUR),
                             group("tiny", 5, Window.MINUTE)), "alice")
    before = h.digest()
    outcome = h.apply(h.reserve_command("alice", 20))
    result = outcome.result
    assert not result.allowed
    assert result.denied_by == "small"  # "tiny" lacks room too, but "small" comes first
    assert result.reservation_id == "" and result.expires_at_ns == 0
    assert [(v.key, v.used, v.held) for v in result.counters] == [
        ("big", 0, 0), ("small", 0, 0), ("tiny", 0, 0)]
    assert result.counters[1].resets_at_ns == T0 + HOUR
    assert outcome.records == ()
    assert h.digest() == before
    assert all(v.held == 0 for v in h.usage("alice").values())


def test_reserve_with_a_reservation_id_in_use_is_already_exists_and_changes_nothing(
        h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat")
    before = h.digest()
    outcome = h.apply(h.reserve_command("alice", 20, reservation_id=held.reservation_id))
    assert isinstance(outcome.error, AlreadyExists) and outcome.records == ()
    assert h.digest() == before and h.counter("alice", "tokens").held == 10


def test_apply_refuses_a_time_before_the_last_record_and_changes_nothing(h: Harness) -> None:
    h.reserve("alice", 10, "openai.chat")
    before = h.digest()
    with pytest.raises(ValueError, match="time went back"):
        h.core.apply(h.reserve_command("alice", 20), h.now - 1)
    assert h.digest() == before


def test_reserve_allowed_up_to_exactly_the_quota_and_denied_one_past_it(h: Harness) -> None:
    h.track("alice", 60, "openai.chat", GPT4O)  # premium used 60
    held = h.reserve("alice", 30, "openai.chat", GPT4O)  # premium held 30
    assert held.allowed
    exact = h.reserve("alice", 10, "openai.chat", GPT4O)  # 60 + 30 + 10 == 100
    assert exact.allowed and exact.counters[1].remaining == 0
    over = h.reserve("alice", 1, "openai.chat", GPT4O)
    assert not over.allowed and over.denied_by == "premium"


def test_quota_zero_denies_any_positive_amount() -> None:
    h = Harness().setup(chat_plan(premium=0), "free")
    denied = h.reserve("free", 1, "openai.chat", GPT4O)
    assert not denied.allowed and denied.denied_by == "premium"
    tracked = h.track("free", 1, "openai.chat", GPT4O, enforce=True)
    assert not tracked.allowed and tracked.denied_by == "premium"
    # the same user may still use a non-premium model, which quota 0 does not touch
    assert h.reserve("free", 1, "openai.chat", {"model": "gpt-4o-mini"}).allowed


def test_event_matching_no_group_is_allowed_gets_an_id_and_its_commit_is_recorded(
        h: Harness) -> None:
    result = h.reserve("alice", 10**9, "image.render")
    assert result.allowed and result.counters == ()
    assert result.reservation_id and result.expires_at_ns == T0 + TTL
    outcome = h.apply(Commit(app=APP, reservation_id=result.reservation_id, amount=7))
    assert outcome.error is None and outcome.result.committed == 7
    assert [type(r.command) for r in outcome.records] == [Commit]


def test_prefix_pattern_matches_event_types_under_it_but_not_the_bare_prefix() -> None:
    h = Harness().setup(plan("p", group("openai", 100, Window.DAY, ["openai.*"])), "alice")
    for event_type, matched in [("openai.chat", True), ("openai.chat.stream", True),
                                ("openai", False), ("openaix.chat", False),
                                ("anthropic.chat", False), ("xopenai.chat", False)]:
        result = h.reserve("alice", 1, event_type)
        assert [v.key for v in result.counters] == (["openai"] if matched else []), event_type


@pytest.mark.parametrize("event_types", [["*"], []], ids=["star", "empty"])
def test_star_and_empty_event_type_list_match_every_event_type(event_types) -> None:
    h = Harness().setup(plan("p", group("all", 100, Window.DAY, event_types)), "alice")
    for event_type in ["openai.chat", "openai", "image.render", "x"]:
        assert [v.key for v in h.reserve("alice", 1, event_type).counters] == ["all"]
    assert h.counter("alice", "all").held == 4


def test_metadata_constraints_must_all_hold_and_a_missing_key_does_not_match() -> None:
    h = Harness().setup(plan("p", group("g", 100, Window.DAY, [],
                                        {"model": ["gpt-4o", "gpt-4-turbo"],
                                         "tier": ["batch"]})), "alice")
    cases = [
        ({"model": "gpt-4o", "tier": "batch"}, True),
        ({"model": "gpt-4-turbo", "tier": "batch", "other": "x"}, True),
        ({"model": "gpt-4o", "tier": "online"}, False),  # one constraint fails
        ({"model": "gpt-4o"}, False),                     # "tier" missing
        ({"tier": "batch"}, False),                       # "model" missing
        ({}, False),
    ]
    for metadata, matched in cases:
        result = h.reserve("alice", 1, "openai.chat", metadata)
        assert [v.key for v in result.counters] == (["g"] if matched else []), metadata


def test_one_event_hits_every_group_it_matches_and_only_those() -> None:
    h = Harness().setup(plan("p",
                             group("total", 100, Window.DAY),
                             group("openai", 100, Window.DAY, ["openai.*"]),
                             group("images", 100, Window.DAY, ["image.render"])), "alice")
    h.track("alice", 5, "openai.chat")
    assert {k: v.used for k, v in h.usage("alice").items()} == {
        "total": 5, "openai": 5, "images": 0}


# --- Commit -------------------------------------------------------------------------------


@pytest.mark.parametrize("amount, used, returned", [
    (40, 40, 60),    # less than reserved: the rest goes back
    (100, 100, 0),   # exactly the reserved amount
    (0, 0, 100),     # nothing was used
    (None, 100, 0),  # default: the reserved amount
])
def test_commit_counts_the_amount_and_returns_the_unused_rest(amount, used, returned) -> None:
    h = Harness().setup(chat_plan(tokens=1000), "alice")
    held = h.reserve("alice", 100, "openai.chat")
    result = h.commit(held.reservation_id, amount)
    assert result.committed == used and result.returned == returned and not result.expired
    assert [(v.key, v.used, v.held, v.remaining) for v in result.counters] == [
        ("tokens", used, 0, 1000 - used)]
    assert h.counter("alice", "tokens").used == used


def test_commit_more_than_reserved_records_the_true_amount_as_overage() -> None:
    h = Harness().setup(chat_plan(tokens=100), "alice")
    held = h.reserve("alice", 80, "openai.chat")
    result = h.commit(held.reservation_id, 150)
    assert result.committed == 150 and result.returned == 0
    tokens = h.counter("alice", "tokens")
    assert (tokens.used, tokens.held, tokens.remaining) == (150, 0, 0)
    assert not h.reserve("alice", 1, "openai.chat").allowed


def test_commit_after_expiry_records_usage_says_expired_and_returns_nothing(h: Harness) -> None:
    held = h.reserve("alice", 50, "openai.chat", ttl_ns=10 * S)
    h.advance(10 * S)
    assert h.counter("alice", "tokens").held == 0  # expired, its amount released
    result = h.commit(held.reservation_id, 30)
    assert result.expired and result.committed == 30 and result.returned == 0
    assert h.counter("alice", "tokens").used == 30


def test_late_commit_of_expired_hold_counts_even_if_its_room_was_taken_meanwhile() -> None:
    """Per the contract usage is never dropped, so used + held may pass the quota this way
    too (one of the recorded paths of protos/DESIGN.md's invariant)."""
    h = Harness().setup(chat_plan(tokens=100), "alice")
    late = h.reserve("alice", 100, "openai.chat", ttl_ns=1 * S)
    h.advance(1 * S)
    assert h.reserve("alice", 100, "openai.chat").allowed  # the expired hold's room, retaken
    assert h.commit(late.reservation_id).expired
    tokens = h.counter("alice", "tokens")
    assert (tokens.used, tokens.held, tokens.remaining) == (100, 100, 0)


def test_commit_after_release_is_failed_precondition_reservation_released(h: Harness) -> None:
    held = h.reserve("alice", 50, "openai.chat")
    h.release(held.reservation_id)
    before = h.digest()
    with pytest.raises(FailedPrecondition) as error:
        h.commit(held.reservation_id, 10)
    assert error.value.reason == "RESERVATION_RELEASED"
    assert h.digest() == before and h.counter("alice", "tokens").used == 0


def test_second_commit_is_reservation_committed_and_never_counts_twice(h: Harness) -> None:
    held = h.reserve("alice", 50, "openai.chat")
    h.commit(held.reservation_id, 20)
    with pytest.raises(FailedPrecondition) as error:
        h.commit(held.reservation_id, 20)
    assert error.value.reason == "RESERVATION_COMMITTED"
    assert h.counter("alice", "tokens").used == 20


def test_commit_of_unknown_reservation_is_not_found(h: Harness) -> None:
    with pytest.raises(NotFound):
        h.commit(rid(999))


# --- Release ------------------------------------------------------------------------------


def test_release_returns_the_whole_hold_on_every_group(h: Harness) -> None:
    held = h.reserve("alice", 40, "openai.chat", GPT4O)
    result = h.release(held.reservation_id)
    assert [(v.key, v.used, v.held) for v in result.counters] == [
        ("tokens", 0, 0), ("premium", 0, 0)]


def test_release_of_released_or_expired_hold_is_a_no_op_success_without_record(
        h: Harness) -> None:
    released = h.reserve("alice", 10, "openai.chat")
    expired = h.reserve("alice", 20, "openai.chat", ttl_ns=5 * S)
    h.release(released.reservation_id)
    h.advance(5 * S)
    h.expire()
    before = h.digest()
    for reservation_id in (released.reservation_id, expired.reservation_id):
        outcome = h.apply(Release(app=APP, reservation_id=reservation_id))
        assert outcome.error is None and outcome.records == ()
        assert [(v.key, v.held) for v in outcome.result.counters] == [("tokens", 0)]
    assert h.digest() == before


def test_release_of_committed_hold_is_failed_precondition_reservation_committed(
        h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat")
    h.commit(held.reservation_id)
    with pytest.raises(FailedPrecondition) as error:
        h.release(held.reservation_id)
    assert error.value.reason == "RESERVATION_COMMITTED"
    assert h.counter("alice", "tokens").used == 10


# --- Extend -------------------------------------------------------------------------------


def test_extend_sets_live_expiry_to_now_plus_ttl_and_may_shorten_it(h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat", ttl_ns=3600 * S)
    h.advance(100 * S)
    shorter = h.extend(held.reservation_id, 5 * S)
    assert shorter.expires_at_ns == T0 + 105 * S
    assert h.core.next_expiry_ns() == T0 + 105 * S
    h.advance(4 * S)
    longer = h.extend(held.reservation_id, 60 * S)
    assert longer.expires_at_ns == T0 + 164 * S
    h.at(T0 + 164 * S - 1)
    assert h.counter("alice", "tokens").held == 10
    h.at(T0 + 164 * S)
    assert h.counter("alice", "tokens").held == 0


@pytest.mark.parametrize("end", ["expired", "released", "committed"])
def test_extend_of_a_finished_hold_is_failed_precondition(h: Harness, end: str) -> None:
    held = h.reserve("alice", 10, "openai.chat", ttl_ns=5 * S)
    if end == "expired":
        h.advance(5 * S)
    elif end == "released":
        h.release(held.reservation_id)
    else:
        h.commit(held.reservation_id)
    h.expire()
    before = h.digest()
    with pytest.raises(FailedPrecondition) as error:
        h.extend(held.reservation_id, 60 * S)
    assert error.value.reason == f"RESERVATION_{end.upper()}"
    assert h.digest() == before


# --- Expiry -------------------------------------------------------------------------------


def test_hold_expires_exactly_at_expires_at_never_earlier_with_expire_holds_record(
        h: Harness) -> None:
    held = h.reserve("alice", 25, "openai.chat", ttl_ns=30 * S)
    expires_at = held.expires_at_ns
    h.at(expires_at - 1)
    outcome = h.apply(GetUsage(app=APP, user_id="alice"))
    assert outcome.records == ()
    assert {v.key: v.held for v in outcome.result.counters}["tokens"] == 25
    h.at(expires_at)
    outcome = h.apply(GetUsage(app=APP, user_id="alice"))
    assert {v.key: v.held for v in outcome.result.counters}["tokens"] == 0
    assert [r.command for r in outcome.records] == [ExpireHolds(expired=(
        ExpiredHold(app=APP, reservation_id=held.reservation_id, user_id="alice"),))]
    assert outcome.records[0].now_ns == expires_at
    assert len(h.core.expiry) == 0 and h.core.next_expiry_ns() is None


def test_expire_holds_command_releases_every_due_hold_in_one_record(h: Harness) -> None:
    first = h.reserve("alice", 1, "openai.chat", ttl_ns=1 * S)
    second = h.reserve("alice", 2, "openai.chat", ttl_ns=2 * S)
    third = h.reserve("alice", 4, "openai.chat", ttl_ns=3 * S)
    h.advance(2 * S)
    outcome = h.expire()
    assert [e.reservation_id for e in outcome.result.expired] == [
        first.reservation_id, second.reservation_id]
    assert len(outcome.records) == 1
    assert h.counter("alice", "tokens").held == 4
    assert h.expire().records == ()  # nothing more due: no record
    assert third.allowed


# --- Track --------------------------------------------------------------------------------


def test_track_positive_records_usage_on_every_matched_group(h: Harness) -> None:
    result = h.track("alice", 70, "openai.chat", GPT4O)
    assert result.allowed
    assert [(v.key, v.used) for v in result.counters] == [("tokens", 70), ("premium", 70)]


def test_track_negative_refunds_but_never_below_zero(h: Harness) -> None:
    h.track("alice", 50, "openai.chat", GPT4O)
    h.track("alice", 30, "anthropic.chat")  # tokens 80, premium 50
    result = h.track("alice", -60, "openai.chat", GPT4O)
    assert [(v.key, v.used) for v in result.counters] == [("tokens", 20), ("premium", 0)]


def test_track_without_enforce_records_usage_past_the_quota(h: Harness) -> None:
    result = h.track("alice", 150, "openai.chat", GPT4O)
    assert result.allowed
    premium = h.counter("alice", "premium")
    assert (premium.used, premium.remaining) == (150, 0)


def test_track_enforce_denies_without_room_and_changes_nothing(h: Harness) -> None:
    h.reserve("alice", 60, "openai.chat", GPT4O)
    allowed = h.track("alice", 40, "openai.chat", GPT4O, enforce=True)  # 0 + 60 + 40 == 100
    assert allowed.allowed and allowed.counters[1].remaining == 0
    before = h.digest()
    outcome = h.apply(h.track_command("alice", 1, "openai.chat", GPT4O, enforce=True))
    assert not outcome.result.allowed and outcome.result.denied_by == "premium"
    assert outcome.records == () and h.digest() == before
    # a refund is always allowed, even with enforce and no room
    assert h.track("alice", -10, "openai.chat", GPT4O, enforce=True).allowed


# --- Idempotency --------------------------------------------------------------------------


def test_idempotent_retry_returns_the_first_answer_and_makes_no_record(h: Harness) -> None:
    first = h.reserve("alice", 10, "openai.chat", key="k1")
    before = h.digest()
    # the server picks a new reservation id for the retry; the answer is still the first
    outcome = h.apply(h.reserve_command("alice", 10, "openai.chat", key="k1"))
    assert outcome.result == first and outcome.records == ()
    assert h.digest() == before
    assert h.counter("alice", "tokens").held == 10


def test_idempotent_retry_of_commit_returns_first_answer_not_reservation_committed(
        h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat")
    first = h.commit(held.reservation_id, 4, key="c1")
    outcome = h.apply(Commit(app=APP, reservation_id=held.reservation_id, amount=4,
                             idempotency_key="c1"))
    assert outcome.error is None and outcome.result == first and outcome.records == ()
    assert h.counter("alice", "tokens").used == 4


def test_idempotent_denied_reserve_stays_denied_after_room_frees(h: Harness) -> None:
    blocker = h.reserve("alice", 100, "openai.chat", GPT4O)
    denied = h.reserve("alice", 50, "openai.chat", GPT4O, key="k")
    assert not denied.allowed
    h.release(blocker.reservation_id)
    retry = h.reserve("alice", 50, "openai.chat", GPT4O, key="k")
    assert retry == denied and not retry.allowed
    assert h.reserve("alice", 50, "openai.chat", GPT4O).allowed  # without the key: room


def test_same_key_with_a_different_request_is_already_exists(h: Harness) -> None:
    h.reserve("alice", 10, "openai.chat", key="k")
    before = h.digest()
    for command in [h.reserve_command("alice", 11, "openai.chat", key="k"),
                    h.reserve_command("alice", 10, "anthropic.chat", key="k"),
                    h.reserve_command("alice", 10, "openai.chat", GPT4O, key="k"),
                    h.reserve_command("alice", 10, "openai.chat", key="k", ttl_ns=61 * S)]:
        outcome = h.apply(command)
        assert isinstance(outcome.error, AlreadyExists), command
        assert outcome.records == ()
    assert h.digest() == before


def test_a_key_read_back_from_a_snapshot_still_tells_a_repeat_from_another_request(
        h: Harness) -> None:
    """In memory an entry keeps the command that made it; a snapshot keeps its fingerprint.
    Either way the same request gets the first answer and another one ALREADY_EXISTS."""
    from quotad.storage.snapshot import core_from_snapshot, snapshot_of

    first = h.reserve("alice", 10, "openai.chat", GPT4O, key="k")
    h.core = core_from_snapshot(snapshot_of(h.core))
    (entry,) = h.core.apps[h.app].idempotency.values()
    assert type(entry.request) is str  # the fingerprint
    before = h.digest()
    assert h.reserve("alice", 10, "openai.chat", GPT4O, key="k") == first
    for command in [h.reserve_command("alice", 11, "openai.chat", GPT4O, key="k"),
                    h.reserve_command("alice", 10, "openai.chat", key="k")]:
        outcome = h.apply(command)
        assert isinstance(outcome.error, AlreadyExists), command
        assert outcome.records == ()
    assert h.digest() == before


def test_same_key_on_a_different_rpc_or_app_is_independent(h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat", key="k")
    tracked = h.track("alice", 3, "openai.chat", key="k")
    committed = h.commit(held.reservation_id, 5, key="k")
    assert tracked.allowed and committed.committed == 5
    h.upsert_plan(chat_plan(), app="other")
    h.subscribe("alice", "pro", app="other")
    other = h.reserve("alice", 10, "openai.chat", key="k", app="other")
    assert other.allowed and other.reservation_id != held.reservation_id
    assert h.counter("alice", "tokens").used == 8


def test_invalid_request_leaves_no_trace_under_its_key(h: Harness) -> None:
    before = h.digest()
    with pytest.raises(InvalidArgument):
        h.reserve_command("alice", 0, "openai.chat", key="k")
    assert h.digest() == before
    # refused by the core (no plan): no trace either
    outcome = h.apply(h.reserve_command("bob", 5, "openai.chat", key="k"))
    assert isinstance(outcome.error, FailedPrecondition) and outcome.records == ()
    assert h.digest() == before
    # so the key is free: a different, valid request under it is answered fresh
    result = h.reserve("alice", 7, "openai.chat", key="k")
    assert result.allowed and h.counter("alice", "tokens").held == 7


def test_idempotency_key_is_remembered_within_retention_and_forgotten_after(
        h: Harness) -> None:
    first = h.track("alice", 5, "openai.chat", key="k")
    h.at(T0 + limits.IDEMPOTENCY_RETENTION_NS_MIN - 1)
    h.track("alice", 1, "anthropic.chat")  # any record: the core forgets what is due
    assert h.track("alice", 5, "openai.chat", key="k") == first  # still remembered
    with pytest.raises(AlreadyExists):
        h.track("alice", 6, "openai.chat", key="k")
    h.at(T0 + limits.IDEMPOTENCY_RETENTION_NS_MIN)
    h.track("alice", 1, "anthropic.chat")
    used = h.counter("alice", "tokens").used
    again = h.track("alice", 6, "openai.chat", key="k")  # a new request, answered fresh
    assert again.allowed and again.counters[0].used == used + 6


# --- Retention of finished reservations ---------------------------------------------------


def test_finished_reservation_is_remembered_within_retention_then_not_found(
        h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat")
    h.commit(held.reservation_id)
    h.at(T0 + limits.RESERVATION_RETENTION_NS - 1)
    h.track("alice", 1, "anthropic.chat")
    with pytest.raises(FailedPrecondition):
        h.commit(held.reservation_id)
    h.at(T0 + limits.RESERVATION_RETENTION_NS)
    h.track("alice", 1, "anthropic.chat")
    for command in [Commit(app=APP, reservation_id=held.reservation_id),
                    Release(app=APP, reservation_id=held.reservation_id),
                    Extend(app=APP, reservation_id=held.reservation_id, ttl_ns=TTL)]:
        assert isinstance(h.apply(command).error, NotFound)
    assert held.reservation_id not in h.core.apps[APP].reservations


def test_finished_hold_past_retention_is_not_found_even_if_nothing_else_happened(
        h: Harness) -> None:
    """Regression: forgetting used to run only when a record was made, so in a quiet core a
    late commit of an expired hold past its retention was still accepted and counted."""
    held = h.reserve("alice", 10, "openai.chat", ttl_ns=1 * S)
    h.advance(1 * S)
    h.expire()  # the hold finishes at T0 + 1 s
    h.at(T0 + 1 * S + limits.RESERVATION_RETENTION_NS - 1)
    assert h.release(held.reservation_id).counters  # still known: a no-op success
    h.at(T0 + 1 * S + limits.RESERVATION_RETENTION_NS)
    before = h.digest()
    for command in [Commit(app=APP, reservation_id=held.reservation_id),
                    Release(app=APP, reservation_id=held.reservation_id),
                    Extend(app=APP, reservation_id=held.reservation_id, ttl_ns=TTL)]:
        outcome = h.apply(command)
        assert isinstance(outcome.error, NotFound), outcome
        assert outcome.records == ()
    assert h.digest() == before
    assert h.counter("alice", "tokens").used == 0


def test_idempotency_key_past_retention_is_free_even_if_nothing_else_happened(
        h: Harness) -> None:
    h.track("alice", 5, "openai.chat", key="k")
    h.at(T0 + limits.IDEMPOTENCY_RETENTION_NS_MIN)  # no record in between
    used = h.counter("alice", "tokens").used
    again = h.track("alice", 6, "openai.chat", key="k")  # not ALREADY_EXISTS: fresh
    assert again.allowed and again.counters[0].used == used + 6
    # remembered anew, for its own full retention (the first use's forgetting, due when the
    # new use made its record, must not drop it)
    assert h.track("alice", 6, "openai.chat", key="k") == again
    h.at(T0 + 2 * limits.IDEMPOTENCY_RETENTION_NS_MIN - 1)
    h.track("alice", 1, "anthropic.chat")
    assert h.track("alice", 6, "openai.chat", key="k") == again
    with pytest.raises(AlreadyExists):
        h.track("alice", 5, "openai.chat", key="k")
    assert digest(h.replayed()) == h.digest()


# --- Subscriptions and plans --------------------------------------------------------------


def test_unsubscribed_user_is_failed_precondition_no_plan(h: Harness) -> None:
    for command in [h.reserve_command("bob", 1), h.track_command("bob", 1),
                    GetUsage(app=APP, user_id="bob")]:
        outcome = h.apply(command)
        assert isinstance(outcome.error, FailedPrecondition), command
        assert outcome.error.reason == "NO_PLAN" and outcome.records == ()


def test_subscription_upsert_of_the_same_plan_is_unchanged_and_makes_no_record(
        h: Harness) -> None:
    before = h.digest()
    outcome = h.apply(UpsertSubscription(app=APP, user_id="alice", plan_id="pro"))
    assert outcome.result.changed is False and outcome.records == ()
    assert h.digest() == before
    # "" is the default zone, UTC: the same subscription too
    outcome = h.apply(UpsertSubscription(app=APP, user_id="alice", plan_id="pro",
                                         time_zone=""))
    assert outcome.result.changed is False and outcome.records == ()


def test_plan_upsert_of_the_same_plan_is_unchanged_and_makes_no_record(h: Harness) -> None:
    outcome = h.apply(UpsertPlan(app=APP, plan=chat_plan()))
    assert outcome.result.changed is False and outcome.records == ()


def test_subscription_to_unknown_plan_is_not_found(h: Harness) -> None:
    outcome = h.apply(UpsertSubscription(app=APP, user_id="bob", plan_id="nope"))
    assert isinstance(outcome.error, NotFound) and outcome.records == ()


def test_plan_change_keeps_used_for_same_key_and_window_and_applies_new_quota_at_once(
        h: Harness) -> None:
    h.track("alice", 60, "openai.chat", GPT4O)  # tokens 60, premium 60 (DAY)
    h.upsert_plan(plan("lite",
                       group("tokens", 50, Window.DAY, ["openai.*"]),    # same key and window
                       group("premium", 80, Window.HOUR, ["openai.*"])))  # same key, new window
    h.subscribe("alice", "lite")
    usage = h.usage("alice")
    assert (usage["tokens"].used, usage["tokens"].quota, usage["tokens"].remaining) == (60, 50, 0)
    assert (usage["premium"].used, usage["premium"].quota) == (0, 80)
    result = h.reserve("alice", 1, "openai.chat")
    assert not result.allowed and result.denied_by == "tokens"


def test_editing_a_plan_applies_its_new_quota_to_every_subscriber_at_once() -> None:
    h = Harness().setup(chat_plan(tokens=100), "alice", "bob")
    h.track("alice", 90, "openai.chat")
    h.track("bob", 10, "openai.chat")
    h.upsert_plan(chat_plan(tokens=95))
    assert h.counter("alice", "tokens").remaining == 5
    assert h.counter("bob", "tokens").remaining == 85
    assert not h.reserve("alice", 6, "openai.chat").allowed
    assert h.reserve("alice", 5, "openai.chat").allowed


def test_delete_plan_in_use_is_plan_in_use_and_unused_plan_deletes() -> None:
    h = Harness().setup(chat_plan(), "alice")
    h.upsert_plan(chat_plan(plan_id="other"))
    before = h.digest()
    outcome = h.apply(DeletePlan(app=APP, plan_id="pro"))
    assert isinstance(outcome.error, FailedPrecondition)
    assert outcome.error.reason == "PLAN_IN_USE" and h.digest() == before
    h.subscribe("alice", "other")  # now nobody uses "pro"
    h.delete_plan("pro")
    assert "pro" not in h.core.apps[APP].plans
    with pytest.raises(NotFound):
        h.delete_plan("pro")


def test_apps_are_isolated_even_for_the_same_user_id() -> None:
    h = Harness().setup(chat_plan(tokens=10), "alice")
    h.upsert_plan(chat_plan(tokens=10), app="other")
    h.subscribe("alice", "pro", app="other")
    h.track("alice", 10, "openai.chat")
    assert h.usage("alice", app="other")["tokens"].used == 0
    assert h.reserve("alice", 10, "openai.chat", app="other").allowed
    held = h.reserve("alice", 1, "image.render", app="other")
    with pytest.raises(PermissionDenied):  # a reservation belongs to its app: never touched
        h.commit(held.reservation_id)


# --- Windows ------------------------------------------------------------------------------


def test_counters_reset_when_their_window_ends() -> None:
    h = Harness().setup(plan("p", group("m", 10, Window.MINUTE),
                             group("life", 100, Window.LIFETIME)), "alice")
    h.track("alice", 10, "x")
    assert not h.reserve("alice", 1, "x").allowed
    h.at(T0 + MINUTE - 1)
    assert h.counter("alice", "m").used == 10
    h.at(T0 + MINUTE)
    m, life = h.counter("alice", "m"), h.counter("alice", "life")
    assert (m.used, m.window_start_ns, m.resets_at_ns) == (0, T0 + MINUTE, T0 + 2 * MINUTE)
    assert (life.used, life.window_start_ns, life.resets_at_ns) == (10, 0, None)
    assert h.reserve("alice", 10, "x").denied_by == ""


@pytest.mark.parametrize("busy_new_window", [False, True], ids=["quiet", "busy"])
def test_hold_taken_before_window_end_and_committed_after_does_not_count_in_new_window(
        busy_new_window: bool) -> None:
    h = Harness().setup(plan("p", group("h", 100, Window.HOUR)), "alice")
    h.at(T0 + 59 * MINUTE)
    held = h.reserve("alice", 80, "x", ttl_ns=3600 * S)
    h.at(T0 + HOUR + MINUTE)  # the next hour
    fresh = h.counter("alice", "h")
    assert (fresh.used, fresh.held, fresh.window_start_ns) == (0, 0, T0 + HOUR)
    new_held = 0
    if busy_new_window:  # the old hold does not count here: the full quota is free
        assert h.reserve("alice", 100, "x").allowed
        new_held = 100
    result = h.commit(held.reservation_id, 90)
    assert result.committed == 90 and result.returned == 0 and not result.expired
    assert [view_tuple(v) for v in result.counters] == [
        ("h", 100, 0, new_held, 100 - new_held, T0 + HOUR, T0 + 2 * HOUR)]
    now = h.counter("alice", "h")
    assert (now.used, now.held, now.window_start_ns) == (0, new_held, T0 + HOUR)
    assert digest(h.replayed()) == h.digest()


def test_reads_change_nothing_even_when_a_new_window_begins(h: Harness) -> None:
    h.track("alice", 5, "openai.chat")
    h.at(T0 + 2 * DAY)
    before = h.digest()
    outcome = h.apply(GetUsage(app=APP, user_id="alice"))
    assert outcome.records == () and h.digest() == before
    assert outcome.result.counters[0].used == 0


def test_day_window_follows_the_subscribers_time_zone() -> None:
    h = Harness().setup(plan("p", group("d", 100, Window.DAY)), "tokyo", time_zone="Asia/Tokyo")
    view = h.counter("tokyo", "d")
    # T0 is 2025-03-03 12:00 UTC = 21:00 in Tokyo: the local day began 21 h earlier,
    # at 2025-03-02 15:00 UTC
    assert view.window_start_ns == T0 - 21 * HOUR
    assert view.resets_at_ns == view.window_start_ns + DAY


def test_commit_in_a_repeated_hour_after_clocks_fell_back_across_midnight() -> None:
    """Regression: St. John's fell back at 00:01 NDT to 23:01 NST (2009-11-01). window_bounds
    used to raise there, after Core._commit had already ended the hold: the state moved on
    with no record. The repeated evening now belongs to the day that already began."""
    start = int(datetime.fromisoformat("2009-11-01T02:00:00+00:00").timestamp()) * S
    h = Harness(now=start).setup(plan("p", group("d", 100, Window.DAY)), "nl",
                                 time_zone="America/St_Johns")
    held = h.reserve("nl", 10, "x", ttl_ns=3600 * S)  # 2009-10-31 23:30 NDT
    assert held.counters[0].resets_at_ns == start + 30 * MINUTE  # 00:00 NDT
    h.at(start + 31 * MINUTE)  # 02:31 UTC = 2009-10-31 23:01 NST, after the fall-back
    result = h.commit(held.reservation_id)
    assert result.committed == 10 and not result.expired
    view = result.counters[0]
    assert (view.used, view.held) == (0, 0)  # the usage counts in the window it was held in
    assert view.window_start_ns == start + 30 * MINUTE
    assert view.resets_at_ns == start + 25 * HOUR + 30 * MINUTE  # 2009-11-02 00:00 NST
    assert digest(h.replayed()) == h.digest()


# --- Limits at their edges ----------------------------------------------------------------

MAX = limits.AMOUNT_MAX


def test_user_id_is_1_to_256_utf8_bytes() -> None:
    h = Harness()
    h.upsert_plan(chat_plan())
    longest = "é" * 128  # 256 bytes
    h.subscribe(longest, "pro")
    assert h.reserve(longest, 1).allowed
    for bad in ["", "é" * 128 + "a", "a" * 257]:
        with pytest.raises(InvalidArgument) as error:
            h.reserve_command(bad, 1)
        assert fields_of(error.value) == {"user_id"}
        with pytest.raises(InvalidArgument) as error:
            h.track_command(bad, 1)
        assert fields_of(error.value) == {"user_id"}


def test_event_type_is_1_to_128_bytes(h: Harness) -> None:
    assert h.reserve("alice", 1, "e" * 128).allowed
    assert h.track("alice", 1, "e" * 128).allowed
    for bad in ["", "e" * 129]:
        with pytest.raises(InvalidArgument) as error:
            h.reserve_command("alice", 1, bad)
        assert fields_of(error.value) == {"event_type"}
        with pytest.raises(InvalidArgument) as error:
            h.track_command("alice", 1, bad)
        assert fields_of(error.value) == {"event_type"}


def test_metadata_holds_at_most_16_entries(h: Harness) -> None:
    sixteen = {f"k{i:02d}": "v" for i in range(16)}
    seventeen = {f"k{i:02d}": "v" for i in range(17)}
    assert h.reserve("alice", 1, "openai.chat", sixteen).allowed
    assert h.track("alice", 1, "openai.chat", sixteen).allowed
    with pytest.raises(InvalidArgument) as error:
        h.reserve_command("alice", 1, "openai.chat", seventeen)
    assert fields_of(error.value) == {"metadata"}
    with pytest.raises(InvalidArgument) as error:
        h.track_command("alice", 1, "openai.chat", seventeen)
    assert fields_of(error.value) == {"metadata"}


@pytest.mark.parametrize("ok, bad", [
    ({"k" * 256: "v"}, {"k" * 257: "v"}),
    ({"k": "v" * 256}, {"k": "v" * 257}),
    ({"k": "é" * 128}, {"k": "é" * 128 + "a"}),
], ids=["key", "value", "value-utf8"])
def test_metadata_key_and_value_are_at_most_256_bytes(h: Harness, ok, bad) -> None:
    assert h.reserve("alice", 1, "openai.chat", ok).allowed
    with pytest.raises(InvalidArgument) as error:
        h.reserve_command("alice", 1, "openai.chat", bad)
    assert fields_of(error.value) == {"metadata"}
    with pytest.raises(InvalidArgument) as error:
        h.track_command("alice", 1, "openai.chat", bad)
    assert fields_of(error.value) == {"metadata"}


def test_metadata_key_must_not_be_empty_and_keys_must_be_unique(h: Harness) -> None:
    for bad in [(("", "v"),), (("k", "a"), ("k", "b"))]:
        with pytest.raises(InvalidArgument) as error:
            Reserve(app=APP, user_id="alice", event_type="e", amount=1, metadata=bad,
                    reservation_id=rid(1))
        assert fields_of(error.value) == {"metadata"}


def test_reserve_amount_is_1_to_2_pow_53() -> None:
    h = Harness().setup(plan("p", group("g", MAX, Window.DAY)), "alice")
    assert h.reserve("alice", 1).allowed
    h.release(h.reserve("alice", MAX - 1).reservation_id)
    assert not h.reserve("alice", MAX).allowed  # 1 is held: no room for 2^53 more
    for bad in [0, -1, MAX + 1]:
        with pytest.raises(InvalidArgument) as error:
            h.reserve_command("alice", bad)
        assert fields_of(error.value) == {"amount"}
    h2 = Harness().setup(plan("p", group("g", MAX, Window.DAY)), "alice")
    assert h2.reserve("alice", MAX).allowed


def test_commit_amount_is_0_to_2_pow_53(h: Harness) -> None:
    first = h.reserve("alice", 1, "image.render")
    assert h.commit(first.reservation_id, 0).committed == 0
    second = h.reserve("alice", 1, "image.render")
    assert h.commit(second.reservation_id, MAX).committed == MAX
    for bad in [-1, MAX + 1]:
        with pytest.raises(InvalidArgument) as error:
            Commit(app=APP, reservation_id=rid(1), amount=bad)
        assert fields_of(error.value) == {"amount"}


def test_track_amount_is_non_zero_and_at_most_2_pow_53_either_way(h: Harness) -> None:
    assert h.track("alice", MAX, "openai.chat").counters[0].used == MAX
    assert h.track("alice", -MAX, "openai.chat").counters[0].used == 0
    for bad in [0, MAX + 1, -MAX - 1]:
        with pytest.raises(InvalidArgument) as error:
            h.track_command("alice", bad)
        assert fields_of(error.value) == {"amount"}


def test_amounts_must_be_ints_not_bools_or_floats(h: Harness) -> None:
    for bad in [True, 1.0]:
        with pytest.raises(InvalidArgument) as error:
            h.reserve_command("alice", bad)  # type: ignore[arg-type]
        assert fields_of(error.value) == {"amount"}


def test_ttl_is_1_second_to_1_hour_for_reserve_and_extend(h: Harness) -> None:
    low = h.reserve("alice", 1, ttl_ns=limits.TTL_NS_MIN)
    high = h.reserve("alice", 1, ttl_ns=limits.TTL_NS_MAX)
    assert low.expires_at_ns == T0 + S and high.expires_at_ns == T0 + 3600 * S
    assert h.extend(high.reservation_id, limits.TTL_NS_MIN).expires_at_ns == T0 + S
    assert h.extend(high.reservation_id, limits.TTL_NS_MAX).expires_at_ns == T0 + 3600 * S
    for bad in [limits.TTL_NS_MIN - 1, limits.TTL_NS_MAX + 1, 0]:
        with pytest.raises(InvalidArgument) as error:
            h.reserve_command("alice", 1, ttl_ns=bad)
        assert fields_of(error.value) == {"ttl"}
        with pytest.raises(InvalidArgument) as error:
            Extend(app=APP, reservation_id=high.reservation_id, ttl_ns=bad)
        assert fields_of(error.value) == {"ttl"}


def test_default_ttl_is_60_seconds(h: Harness) -> None:
    assert h.reserve("alice", 1).expires_at_ns == T0 + 60 * S


def test_idempotency_key_is_at_most_128_bytes(h: Harness) -> None:
    assert h.reserve("alice", 1, key="k" * 128).allowed
    assert h.track("alice", 1, key="k" * 128).allowed
    held = h.reserve("alice", 1)
    assert h.commit(held.reservation_id, key="k" * 128).committed == 1
    builders = [
        lambda key: h.reserve_command("alice", 1, key=key),
        lambda key: h.track_command("alice", 1, key=key),
        lambda key: Commit(app=APP, reservation_id=rid(1), idempotency_key=key),
        lambda key: Release(app=APP, reservation_id=rid(1), idempotency_key=key),
        lambda key: Extend(app=APP, reservation_id=rid(1), ttl_ns=TTL, idempotency_key=key),
    ]
    for build in builders:
        with pytest.raises(InvalidArgument) as error:
            build("k" * 129)
        assert fields_of(error.value) == {"idempotency_key"}


def test_plan_holds_at_most_32_limit_groups() -> None:
    h = Harness()
    groups = [group(f"g{i}", 10, Window.DAY) for i in range(33)]
    full = plan("full", *groups[:32])
    h.setup(full, "alice")
    assert len(h.reserve("alice", 1).counters) == 32
    with pytest.raises(InvalidArgument) as error:
        plan("over", *groups)
    assert "plan.limit_groups" in fields_of(error.value)


def test_a_group_matches_at_most_its_patterns_metadata_keys_and_values() -> None:
    patterns = [f"e{i}" for i in range(limits.EVENT_TYPE_PATTERNS_PER_GROUP_MAX + 1)]
    values = [f"v{i}" for i in range(limits.METADATA_MATCH_VALUES_MAX + 1)]
    keys = [f"k{i}" for i in range(limits.METADATA_MATCHES_PER_GROUP_MAX + 1)]
    plan("p", group("g", 1, event_types=patterns[:-1],
                    metadata={key: values[:-1] for key in keys[:-1]}))
    for over, field in (
            (group("g", 1, event_types=patterns), "match.event_types"),
            (group("g", 1, metadata={key: ["v"] for key in keys}), "match.metadata"),
            (group("g", 1, metadata={"k": values}), "match.metadata[0].values")):
        with pytest.raises(InvalidArgument) as error:
            plan("p", over)
        assert fields_of(error.value) == {f"plan.limit_groups[0].{field}"}


def test_plan_and_group_ids_must_be_non_empty_and_group_keys_unique() -> None:
    with pytest.raises(InvalidArgument) as error:
        plan("")
    assert fields_of(error.value) == {"plan.id"}
    with pytest.raises(InvalidArgument) as error:
        plan("p", group("", 1))
    assert fields_of(error.value) == {"plan.limit_groups[0].key"}
    with pytest.raises(InvalidArgument) as error:
        plan("p", group("g", 1), group("g", 2))
    assert fields_of(error.value) == {"plan.limit_groups"}


def test_quota_is_0_to_2_pow_53() -> None:
    plan("p", group("g", 0), group("h", limits.QUOTA_MAX))
    for bad in [-1, limits.QUOTA_MAX + 1]:
        with pytest.raises(InvalidArgument) as error:
            plan("p", group("g", bad))
        assert fields_of(error.value) == {"plan.limit_groups[0].quota"}


def test_reservation_id_must_be_rsv_and_24_lowercase_hex() -> None:
    Commit(app=APP, reservation_id=rid(1))
    for bad in ["", "rsv_" + "0" * 23, "rsv_" + "0" * 25, "rsv_" + "A" * 24, "abc_" + "0" * 24]:
        with pytest.raises(InvalidArgument) as error:
            Commit(app=APP, reservation_id=bad)
        assert fields_of(error.value) == {"reservation_id"}


def test_unknown_time_zone_is_invalid_argument() -> None:
    UpsertSubscription(app=APP, user_id="u", plan_id="p", time_zone="America/New_York")
    for bad in ["Mars/Olympus", "../etc/passwd", "x" * 65]:
        with pytest.raises(InvalidArgument) as error:
            UpsertSubscription(app=APP, user_id="u", plan_id="p", time_zone=bad)
        assert fields_of(error.value) == {"time_zone"}


def test_invalid_argument_names_every_bad_field_at_once() -> None:
    with pytest.raises(InvalidArgument) as error:
        Reserve(app=APP, user_id="", event_type="", amount=0, ttl_ns=0, reservation_id="x",
                idempotency_key="k" * 129)
    assert fields_of(error.value) == {"user_id", "event_type", "amount", "ttl",
                                      "reservation_id", "idempotency_key"}


def test_live_holds_per_user_max_then_resource_exhausted_too_many_holds() -> None:
    h = Harness().setup(plan("p", group("g", 10**9, Window.DAY)), "alice", "bob")
    ttl = 3600 * S
    for _ in range(limits.LIVE_HOLDS_PER_USER_MAX - 1):
        h.reserve("alice", 1, ttl_ns=ttl)
    last = h.reserve("alice", 1, ttl_ns=ttl)  # the MAX-th live hold is still allowed
    assert last.allowed
    assert h.core.apps[APP].users["alice"].live_holds == limits.LIVE_HOLDS_PER_USER_MAX
    before = h.digest()
    outcome = h.apply(h.reserve_command("alice", 1, ttl_ns=ttl))
    assert isinstance(outcome.error, ResourceExhausted)
    assert outcome.error.reason == "TOO_MANY_HOLDS"
    assert outcome.records == () and h.digest() == before
    assert h.reserve("bob", 1).allowed  # per user: others are not affected
    h.release(last.reservation_id)
    assert h.reserve("alice", 1, ttl_ns=ttl).allowed  # room again once one ended


def test_rejected_commands_leave_the_state_unchanged(h: Harness) -> None:
    held = h.reserve("alice", 10, "openai.chat", key="r")
    released = h.reserve("alice", 10, "openai.chat")
    h.release(released.reservation_id)
    committed = h.reserve("alice", 10, "openai.chat")
    h.commit(committed.reservation_id)
    h.upsert_plan(chat_plan(plan_id="spare"))
    before = h.digest()
    rejected = [
        h.reserve_command("bob", 1),                                    # NO_PLAN
        h.reserve_command("alice", 5, key="r"),                         # ALREADY_EXISTS
        Commit(app=APP, reservation_id=rid(10**6)),                     # NOT_FOUND
        Commit(app=APP, reservation_id=released.reservation_id),        # RELEASED
        Commit(app=APP, reservation_id=committed.reservation_id),       # COMMITTED
        Release(app=APP, reservation_id=committed.reservation_id),      # COMMITTED
        Extend(app=APP, reservation_id=released.reservation_id, ttl_ns=TTL),
        DeletePlan(app=APP, plan_id="pro"),                             # PLAN_IN_USE
        DeletePlan(app=APP, plan_id="missing"),                         # NOT_FOUND
        UpsertSubscription(app=APP, user_id="bob", plan_id="missing"),  # NOT_FOUND
        Commit(app="elsewhere", reservation_id=held.reservation_id),    # NOT_FOUND
    ]
    for command in rejected:
        outcome = h.apply(command)
        assert outcome.error is not None and outcome.records == (), command
        assert h.digest() == before, command


# --- Replay -------------------------------------------------------------------------------


def scenario() -> Harness:
    """A run touching every kind of record: plans, subscriptions, holds of every ending,
    idempotency keys, expiry, window rollover, forgetting after retention."""
    h = Harness().setup(chat_plan(tokens=500, premium=50), "alice", "bob")
    h.subscribe("carol", "pro", "America/New_York")
    a = h.reserve("alice", 40, "openai.chat", GPT4O, key="a1")
    b = h.reserve("bob", 30, "anthropic.chat", ttl_ns=5 * S)
    c = h.reserve("carol", 20, "openai.chat", ttl_ns=2 * S)
    h.reserve("alice", 40, "openai.chat", GPT4O, key="a1")  # retry: no record
    h.advance(3 * S)
    h.commit(a.reservation_id, 45, key="c1")
    h.extend(b.reservation_id, 10 * S)
    h.track("alice", -5, "openai.chat", GPT4O)
    h.track("bob", 20, "openai.chat", GPT4O, enforce=True, key="t1")
    assert not h.reserve("bob", 31, "openai.chat", GPT4O).allowed
    h.commit(c.reservation_id)  # expired: counts anyway
    h.advance(20 * S)
    d = h.reserve("alice", 1, "image.render")
    h.release(d.reservation_id)
    h.upsert_plan(chat_plan(tokens=400, premium=60))
    h.upsert_plan(chat_plan(plan_id="spare"))
    h.subscribe("bob", "spare")
    h.at(T0 + DAY)
    h.reserve("alice", 10, "openai.chat")
    h.at(T0 + 3 * DAY)
    h.track("carol", 1, "openai.chat")
    h.expire()
    return h


def test_replaying_every_record_into_a_fresh_core_gives_an_identical_state() -> None:
    h = scenario()
    assert len(h.records) > 15
    assert [r.sequence for r in h.records] == list(range(1, len(h.records) + 1))
    fresh = replay_all(h.records)
    assert digest(fresh) == h.digest()
    # and the replayed core answers like the original
    assert fresh.apply(GetUsage(app=APP, user_id="alice"), h.now).result == \
        h.core.apply(GetUsage(app=APP, user_id="alice"), h.now).result


def test_replay_of_any_prefix_gives_the_state_of_the_run_at_that_point() -> None:
    h = Harness().setup(chat_plan(), "alice")
    digests = {}
    for step in range(6):
        held = h.reserve("alice", 5 + step, "openai.chat", ttl_ns=2 * S)
        if step % 2:
            h.commit(held.reservation_id, step)
        h.advance(S * step)
        digests[len(h.records)] = h.digest()
    for count, expected in digests.items():
        assert digest(replay_all(h.records[:count])) == expected


def test_replay_detects_a_log_missing_an_expiry_record() -> None:
    h = Harness().setup(chat_plan(), "alice")
    h.reserve("alice", 5, "openai.chat", ttl_ns=1 * S)
    h.advance(2 * S)
    h.track("alice", 1, "openai.chat")
    assert isinstance(h.records[-2].command, ExpireHolds)
    tampered = h.records[:-2] + h.records[-1:]
    with pytest.raises(AssertionError, match="replay diverged"):
        replay_all(tampered)


def test_replay_checks_the_counters_a_keyed_record_answered_with() -> None:
    """Replay leaves out the counter views of records that keep no answer, never of those
    that do: an answer whose counters differ from what the state gives is a divergence."""
    h = Harness().setup(chat_plan(), "alice")
    held = h.reserve("alice", 5, "openai.chat", key="k1")
    h.commit(held.reservation_id, 3, key="k2")
    h.track("alice", 2, "openai.chat")  # no key: no answer kept, no views on replay
    assert digest(replay_all(h.records)) == h.digest()
    keyed = h.records[-2]
    assert keyed.answer is not None and keyed.answer.counters, keyed
    (view,) = keyed.answer.counters
    wrong = replace(keyed, answer=replace(keyed.answer, counters=(replace(view, used=99),)))
    with pytest.raises(AssertionError, match="replay diverged"):
        replay_all(h.records[:-2] + [wrong] + h.records[-1:])


def test_scenario_is_deterministic() -> None:
    assert scenario().records == scenario().records
    assert digest(scenario().core) == digest(scenario().core)


def test_fresh_core_digest_differs_from_used_one() -> None:
    """The digest sees the state: a sanity check that equal digests mean something."""
    h = Harness().setup(chat_plan(), "alice")
    empty = digest(Core())
    assert h.digest() != empty
    before = h.digest()
    h.track("alice", 1, "openai.chat")
    assert h.digest() != before


def test_counters_stop_at_counter_max_and_the_refused_change_leaves_no_trace():
    h = Harness().setup(plan("big", group("units", 1000, Window.LIFETIME)), "u1")
    steps = limits.COUNTER_MAX // limits.AMOUNT_MAX
    for _ in range(steps):
        h.track("u1", limits.AMOUNT_MAX)  # Track without enforce: usage past the quota
    assert h.counter("u1", "units").used == limits.COUNTER_MAX
    before = h.digest()
    with pytest.raises(ResourceExhausted) as refused:
        h.track("u1", 1)
    assert refused.value.reason == "COUNTER_LIMIT"
    assert not h.reserve("u1", 1).allowed  # a denial, as for any user past the quota
    assert h.digest() == before


def test_a_changed_plan_matches_by_its_new_rules_the_same_request_the_old_one_matched(
        h: Harness) -> None:
    assert [c.key for c in h.reserve("alice", 1, "openai.chat", GPT4O).counters] == [
        "tokens", "premium"]
    h.upsert_plan(plan("pro", group("tokens", 1000, Window.DAY, ["anthropic.*"])))
    assert h.reserve("alice", 1, "openai.chat", GPT4O).counters == ()
    assert [c.key for c in h.reserve("alice", 1, "anthropic.claude").counters] == ["tokens"]


def test_the_core_remembers_at_most_match_cache_entries_max_request_shapes(h: Harness) -> None:
    shapes = limits.MATCH_CACHE_ENTRIES_MAX + 10
    for n in range(shapes):
        result = h.reserve("alice", 1, "openai.chat", {"model": f"m{n}"})
        assert [c.key for c in result.counters] == ["tokens"]
        assert len(h.core._matched_cache) <= limits.MATCH_CACHE_ENTRIES_MAX
    assert [c.key for c in h.reserve("alice", 1, "openai.chat", GPT4O).counters] == [
        "tokens", "premium"]
