"""When to retry a call, and how long to wait before the next attempt.

UNAVAILABLE is retried (the server is starting, draining, or unreachable) for calls that are
safe to send twice (see ``Op.retryable``). A call the server shed (RESOURCE_EXHAUSTED
``OVERLOADED`` with a RetryInfo) is retried whatever it is: the server did nothing with it,
so it cannot land twice; the wait is at least the server's delay. Waits grow exponentially
with random jitter (so shed callers do not come back together), retries are bounded, and every
attempt of one call shares one deadline: the call's ``timeout_s`` is the budget of the whole
call, retries included.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
SLOTS_MOVING_RETRIES_MAX = 100
"""A call refused SLOTS_MOVING (its user's slot is moving between shards, nothing done) is sent
again after the server's delay (50 ms) at most this many times, within its deadline, then the
caller gets the refusal (not retried again as an UNAVAILABLE): a move freezes its slots for
well under a second."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    """Retries after the first attempt (0: never retry)."""
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.5
    """Fraction of each wait that is random: a wait is base * (1 - jitter * U[0, 1))."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0 for the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        return base * (1.0 - self.jitter * self.rng.random())

    def next_wait(self, *, retry: int, code: grpc.StatusCode, retryable: bool,
                  deadline: float, now: float | None = None,
                  shed_delay_s: float | None = None) -> float | None:
        """The wait before retry number ``retry``, or None when the call must fail now.

        ``shed_delay_s``: the server shed the call and asks for that delay (see
        ``_errors.shed_delay_s``); the wait is that delay plus the backoff, for any call.
        None when the code is not retried, the call is unsafe to repeat, the retries are used
        up, or the wait would leave no time of the deadline (``time.monotonic()`` based).
        """
        if retry >= self.retries:
            return None
        if shed_delay_s is None and (not retryable or code not in RETRYABLE_CODES):
            return None
        wait = self.backoff(retry) + (shed_delay_s or 0.0)
        now = time.monotonic() if now is None else now
        if now + wait >= deadline:
            return None
        return wait
