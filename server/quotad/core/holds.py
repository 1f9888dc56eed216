"""The life of a hold, as a table: what each event does to a hold in each state.

A hold is live until it is committed, released or expires. The transitions are data, one row
per (state, event) pair, every pair listed once: the core looks its step up here with one
lookup before it changes anything, and an illegal step raises FailedPrecondition (with the
row's reason), so that a refused command leaves the state as it was.

A legal step to the same state is a success that changes nothing (Release of a hold that is
no longer live), except Extend, which keeps a live hold live with a new expiry. A repeated
Commit never counts twice: a retry that must succeed carries an idempotency key, and the
core answers it from its idempotency entry without looking here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from quotad.core.errors import FailedPrecondition
from quotad_contract.errors import ErrorReason


class HoldState(enum.Enum):
    """The values are what snapshots store."""

    LIVE = "live"
    EXPIRED = "expired"
    RELEASED = "released"
    COMMITTED = "committed"

    __hash__ = object.__hash__
    """Members are singletons compared by identity, so the identity hash is right; it spares
    each table lookup the Python-level call of Enum.__hash__ (Commit is on the hot path)."""


class HoldEvent(enum.Enum):
    COMMIT = "commit"
    RELEASE = "release"
    EXTEND = "extend"
    EXPIRE = "expire"
    """Only the expiry sweep, for a live hold whose expires_at_ns has come."""

    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Refused:
    """An illegal step: it raises FailedPrecondition(reason, message) and changes nothing."""

    reason: ErrorReason
    message: str


LIVE, EXPIRED, RELEASED, COMMITTED = HoldState
COMMIT, RELEASE, EXTEND, EXPIRE = HoldEvent
_ENDED_REASONS = {EXPIRED: ErrorReason.RESERVATION_EXPIRED,
                  RELEASED: ErrorReason.RESERVATION_RELEASED,
                  COMMITTED: ErrorReason.RESERVATION_COMMITTED}


def _not_live(event: str, state: HoldState) -> Refused:
    return Refused(_ENDED_REASONS[state], f"only a live hold {event}; this one is {state.value}")


ROWS: tuple[tuple[HoldState, HoldEvent, HoldState | Refused], ...] = (
    (LIVE, COMMIT, COMMITTED),
    (EXPIRED, COMMIT, COMMITTED),  # usage is never dropped; the result says expired
    (RELEASED, COMMIT, Refused(ErrorReason.RESERVATION_RELEASED,
                               "the hold was released: its caller said it was not used")),
    (COMMITTED, COMMIT, Refused(ErrorReason.RESERVATION_COMMITTED,
                                "the hold is already committed")),

    (LIVE, RELEASE, RELEASED),
    (EXPIRED, RELEASE, EXPIRED),  # nothing is held any more: a success that changes nothing
    (RELEASED, RELEASE, RELEASED),  # likewise
    (COMMITTED, RELEASE, Refused(ErrorReason.RESERVATION_COMMITTED,
                                 "the hold is committed: its usage stands")),

    (LIVE, EXTEND, LIVE),  # with a new expiry
    (EXPIRED, EXTEND, _not_live("can be extended", EXPIRED)),
    (RELEASED, EXTEND, _not_live("can be extended", RELEASED)),
    (COMMITTED, EXTEND, _not_live("can be extended", COMMITTED)),

    (LIVE, EXPIRE, EXPIRED),
    (EXPIRED, EXPIRE, _not_live("expires", EXPIRED)),  # the sweep sees only live holds
    (RELEASED, EXPIRE, _not_live("expires", RELEASED)),
    (COMMITTED, EXPIRE, _not_live("expires", COMMITTED)),
)
"""(state, event, the state after it or why it is refused), every pair once."""

TRANSITIONS: dict[tuple[HoldState, HoldEvent], HoldState | Refused] = {
    (state, event): after for state, event, after in ROWS}
REFUSAL_REASONS: dict[tuple[HoldState, HoldEvent], ErrorReason] = {
    pair: after.reason for pair, after in TRANSITIONS.items() if type(after) is Refused}
"""The reason of each refused step: every reason the server sends is an ErrorReason member
looked up where it is raised, which is how tests/test_errors.py finds them all."""


def next_state(state: HoldState, event: HoldEvent) -> HoldState:
    """The state the event takes a hold in this state to; FailedPrecondition if it may not
    happen. Pure: the caller changes the hold."""
    after = TRANSITIONS[state, event]
    if type(after) is Refused:
        raise FailedPrecondition(REFUSAL_REASONS[state, event], after.message)
    return after
