"""Rate buckets: the arithmetic of a RATE group's counter, in integers only.

A RATE group is a token bucket of capacity `quota` that refills `quota` tokens every
`period_ns`, continuously. Its counter is an ordinary CounterState read differently:

- `held` is what live holds have taken. It comes back whole when a hold is released or
  expires, and the part a commit did not use comes back at the commit.
- `used` is what commits and tracks took and the refill has not yet brought back. It drains
  by quota x elapsed_ns // period_ns, the remainder carried in `refill_carry`, so that no
  fraction (and no float) ever enters the state and replay at the same times is exact.
- The tokens available are quota - used - held (the counter's `remaining`).

Time is the `now_ns` the core is given, never a clock of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quotad.core.values import replace

if TYPE_CHECKING:
    from quotad.core.machine import CounterState


def refilled(counter: CounterState, quota: int, period_ns: int, now_ns: int) -> CounterState:
    """The counter as it is at now_ns: a copy with the refill since `refilled_at_ns` taken
    off `used` (the counter itself when nothing has passed). Never mutates, so that a read
    changes nothing; a change stores the copy."""
    elapsed_ns = now_ns - counter.refilled_at_ns
    if elapsed_ns <= 0:
        return counter
    total = quota * elapsed_ns + counter.refill_carry
    used = counter.used - total // period_ns
    if used <= 0:  # full: what would refill past the capacity is lost
        return replace(counter, used=0, refill_carry=0, refilled_at_ns=now_ns)
    return replace(counter, used=used, refill_carry=total % period_ns, refilled_at_ns=now_ns)


def _after_refill_of(counter: CounterState, quota: int, period_ns: int,
                     tokens: int) -> int | None:
    """When `tokens` more have refilled, for a counter refilled at its refilled_at_ns;
    None if they never will (quota 0)."""
    if tokens <= 0:
        return counter.refilled_at_ns
    if quota == 0:
        return None
    needed = tokens * period_ns - counter.refill_carry
    return counter.refilled_at_ns + -(-needed // quota)


def full_at_ns(counter: CounterState, quota: int, period_ns: int) -> int | None:
    """When everything commits and tracks took is back, if nothing else happens (live holds
    keep their tokens until they end); None if never (quota 0)."""
    return _after_refill_of(counter, quota, period_ns, counter.used)


def fits_at_ns(counter: CounterState, quota: int, period_ns: int, amount: int) -> int | None:
    """When `amount` more tokens will be available, if nothing else happens; None if only
    the end of live holds could make room (amount + held above the capacity)."""
    room_for_used = quota - counter.held - amount
    if room_for_used < 0:
        return None
    return _after_refill_of(counter, quota, period_ns, counter.used - room_for_used)
