"""Adaptive throttling: a client that sees the server refuse its calls for overload refuses
some of its own calls before sending them.

Offered far more calls than it can serve, a server spends CPU on each call it refuses, and
its clients spend CPU on each refusal and each retry: on shared cores the two take the
server's CPU, and what it serves falls. So each client keeps, over the last WINDOW_S
seconds, how many of its attempts ended (`requests`) and how many of those the server took
(`accepts`: answered, or refused for another reason than overload), and refuses an attempt
itself with probability

    max(0, (requests - K * accepts) / (requests + 1))

as Google's SRE book describes ("Handling Overload", client-side throttling). While the
server takes nearly everything the probability is 0; when it takes less than 1/K of what is
sent, the client sends about K times what it takes and refuses the rest at once, at no cost
to the server. An attempt refused by the client counts as a request, so the throttle stays
on while the overload lasts, and accepts bring it back down. Attempts count when they end,
not when they start: a burst of calls sent together (a coalesced Batch) is judged by its
outcomes, not refused for having no outcomes yet.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import grpc

from quotad_contract.errors import ErrorReason

from ._errors import QuotadError, ResourceExhausted

K = 2.0
"""Sent attempts the client allows per accepted one before it refuses some itself."""
WINDOW_S = 10.0
"""How far back requests and accepts are counted."""
REQUESTS_MIN = 20
"""Below this many attempts ended in the window, nothing is refused: a couple of failures
(a server restarting) are no overload to throttle for."""
BUCKETS = 10
"""The window's counts are kept in this many buckets of WINDOW_S / BUCKETS each."""
THROTTLED = "CLIENT_THROTTLED"
"""The reason of a ResourceExhausted the client raised itself: its throttle refused the
attempt, which never reached the server."""
NOT_ACCEPTED_CODES = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Failures that count as not accepted, with RESOURCE_EXHAUSTED OVERLOADED (shed): refused by
gRPC's full queue, or not answered in time. Any other answer, an error included (a
RESOURCE_EXHAUSTED about the user's holds, say), was the server's to give."""
UNCOUNTED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Failures the throttle leaves out: no server answered (stopped, restarting, unreachable).
Sparing it saves nobody any work, and counting them would keep refusing calls for a window
after it is back; the client's retries and backoff are what deal with a server away."""


class AdaptiveThrottle:
    """Requests and accepts over the last WINDOW_S seconds, and the local refusals they call
    for. Safe to share between threads and tasks (one lock, held for a few operations)."""

    def __init__(self, *, k: float = K, window_s: float = WINDOW_S, buckets: int = BUCKETS,
                 requests_min: int = REQUESTS_MIN, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if k < 1 or window_s <= 0 or buckets < 1 or requests_min < 0:
            raise ValueError("k must be >= 1, window_s > 0, buckets >= 1 and requests_min >= 0")
        self.k = k
        self.requests_min = requests_min
        self._bucket_s = window_s / buckets
        self._epochs = [-1] * buckets
        self._requests = [0] * buckets
        self._accepts = [0] * buckets
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        self.refused = 0
        """Attempts refused by this throttle so far."""

    def _bucket(self) -> int:
        """The current bucket, emptied if it last counted an older period (lock held)."""
        epoch = int(self._clock() // self._bucket_s)
        index = epoch % len(self._epochs)
        if self._epochs[index] != epoch:
            self._epochs[index] = epoch
            self._requests[index] = self._accepts[index] = 0
        return index

    def _window(self) -> tuple[int, int]:
        """(requests, accepts) of the buckets still in the window (lock held)."""
        oldest = int(self._clock() // self._bucket_s) - len(self._epochs) + 1
        requests = accepts = 0
        for index, epoch in enumerate(self._epochs):
            if epoch >= oldest:
                requests += self._requests[index]
                accepts += self._accepts[index]
        return requests, accepts

    def _probability(self) -> float:
        """The refusal probability now (lock held)."""
        requests, accepts = self._window()
        if requests < self.requests_min:
            return 0.0
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def refusal_probability(self) -> float:
        with self._lock:
            return self._probability()

    def refuse(self) -> bool:
        """True when the client should refuse this attempt instead of sending it (counted as
        an attempt that ended, not accepted); False: send it, and say how it ended
        (`accepted` or `failed`)."""
        with self._lock:
            probability = self._probability()
            refused = probability > 0 and self._rng.random() < probability
            if refused:
                self._requests[self._bucket()] += 1
                self.refused += 1
        return refused

    def accepted(self) -> None:
        """An attempt sent ended, taken by the server."""
        self.ended(accepted=True)

    def ended(self, *, accepted: bool) -> None:
        """An attempt sent ended: taken by the server, or not (refused for overload)."""
        with self._lock:
            index = self._bucket()
            self._requests[index] += 1
            self._accepts[index] += accepted

    def failed(self, error: QuotadError) -> None:
        """An attempt sent ended in an error: taken by the server unless it is overload; not
        counted when no server answered."""
        if error.code in UNCOUNTED_CODES:
            return
        self.ended(accepted=not (error.code in NOT_ACCEPTED_CODES or (
            isinstance(error, ResourceExhausted) and error.reason == ErrorReason.OVERLOADED)))


def throttled() -> ResourceExhausted:
    """What a call raises when the client's throttle refused its last attempt."""
    return ResourceExhausted(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "refused by this client's adaptive throttle, not sent: quotad has been refusing most "
        "calls for overload (quotad_client._throttle)", THROTTLED)


def throttle_at(own: AdaptiveThrottle | None, shards: dict[str, AdaptiveThrottle],
                address: str | None, own_addresses: tuple[str, ...]) -> AdaptiveThrottle | None:
    """The throttle of the server at ``address`` (None, or one of ``own_addresses``: the
    client's target, whose throttle is ``own``), made on first use: one per shard, so that a
    shard refusing for overload makes the client spare that shard alone. None: throttling is
    off."""
    if own is None or address is None or address in own_addresses:
        return own
    found = shards.get(address)
    if found is None:
        found = shards[address] = AdaptiveThrottle()
    return found
