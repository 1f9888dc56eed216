"""The hold lifecycle table alone, then that the core follows it for every pair."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from core_helpers import APP, S, Harness, digest, group, plan
from quotad.core.commands import Commit, Extend, Release
from quotad.core.errors import FailedPrecondition
from quotad.core.holds import ROWS, TRANSITIONS, HoldEvent, HoldState, Refused, next_state

PAIRS = list(itertools.product(HoldState, HoldEvent))


def test_every_state_and_event_pair_has_exactly_one_row() -> None:
    rows = Counter((state, event) for state, event, _ in ROWS)
    assert set(rows) == set(PAIRS)
    assert set(rows.values()) == {1}
    assert len(TRANSITIONS) == len(PAIRS)


def test_the_legal_steps_are_exactly_these() -> None:
    L, X, R, C = HoldState.LIVE, HoldState.EXPIRED, HoldState.RELEASED, HoldState.COMMITTED
    legal = {pair: after for pair, after in TRANSITIONS.items() if isinstance(after, HoldState)}
    assert legal == {
        (L, HoldEvent.COMMIT): C, (X, HoldEvent.COMMIT): C,
        (L, HoldEvent.RELEASE): R, (X, HoldEvent.RELEASE): X, (R, HoldEvent.RELEASE): R,
        (L, HoldEvent.EXTEND): L,
        (L, HoldEvent.EXPIRE): X,
    }


def test_only_a_live_hold_leaves_its_state_or_is_extended() -> None:
    for (state, event), after in TRANSITIONS.items():
        if state is not HoldState.LIVE and isinstance(after, HoldState):
            assert (after, event) in ((state, HoldEvent.RELEASE),
                                      (HoldState.COMMITTED, HoldEvent.COMMIT))


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=lambda value: value.value)
def test_a_step_gives_its_row_and_an_illegal_one_raises_changing_nothing(
        state: HoldState, event: HoldEvent) -> None:
    table_before = dict(TRANSITIONS)
    after = TRANSITIONS[state, event]
    if isinstance(after, Refused):
        with pytest.raises(FailedPrecondition) as error:
            next_state(state, event)
        assert (error.value.reason, error.value.message) == (after.reason, after.message)
        assert error.value.reason.startswith("RESERVATION_")
    else:
        assert next_state(state, event) is after
    assert TRANSITIONS == table_before


def test_the_refusals_name_the_state_the_hold_is_in() -> None:
    reasons = {pair: after.reason for pair, after in TRANSITIONS.items()
               if isinstance(after, Refused)}
    assert reasons == {(state, event): f"RESERVATION_{state.name}" for state, event in reasons}
    assert (HoldState.LIVE, HoldEvent.COMMIT) not in reasons


# --- the core follows the table -----------------------------------------------------------


def _hold_in(h: Harness, state: HoldState) -> str:
    """A hold of user alice brought to the state through the core's own commands."""
    held = h.reserve("alice", 10, "e", ttl_ns=10 * S).reservation_id
    if state is HoldState.COMMITTED:
        h.commit(held)
    elif state is HoldState.RELEASED:
        h.release(held)
    elif state is HoldState.EXPIRED:
        h.advance(10 * S)
        h.expire()
    return held


_COMMANDS = {
    HoldEvent.COMMIT: lambda reservation_id: Commit(app=APP, reservation_id=reservation_id),
    HoldEvent.RELEASE: lambda reservation_id: Release(app=APP, reservation_id=reservation_id),
    HoldEvent.EXTEND: lambda reservation_id: Extend(app=APP, reservation_id=reservation_id,
                                                    ttl_ns=60 * S),
}


@pytest.mark.parametrize(("state", "event"), [(s, e) for s, e in PAIRS if e in _COMMANDS],
                         ids=lambda value: value.value)
def test_the_core_takes_each_hold_where_the_table_says(state: HoldState,
                                                       event: HoldEvent) -> None:
    h = Harness().setup(plan("p", group("units", 100)), "alice")
    held = _hold_in(h, state)
    before = h.digest()
    outcome = h.apply(_COMMANDS[event](held))
    after = TRANSITIONS[state, event]
    if isinstance(after, Refused):
        assert isinstance(outcome.error, FailedPrecondition)
        assert outcome.error.reason == after.reason and outcome.records == ()
        assert h.digest() == before
    else:
        assert outcome.error is None
        assert h.core.apps[APP].reservations[held].status is after
        assert (h.digest() == before) == (after is state and event is not HoldEvent.EXTEND)
    assert digest(h.replayed()) == h.digest()


def test_the_expiry_sweep_takes_a_live_hold_to_expired() -> None:
    h = Harness().setup(plan("p", group("units", 100)), "alice")
    held = _hold_in(h, HoldState.LIVE)
    h.advance(10 * S)
    assert h.expire().result.expired[0].reservation_id == held
    assert h.core.apps[APP].reservations[held].status is TRANSITIONS[
        HoldState.LIVE, HoldEvent.EXPIRE]
